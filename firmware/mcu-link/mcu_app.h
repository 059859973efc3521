/* SPDX-License-Identifier: Apache-2.0
 *
 * The companion-MCU side of docs/mcu-protocol.md: periodic HEARTBEAT and READINGS, the
 * accelerator rail switched on RAIL_COMMAND (ACK/NACK, then READINGS), WAKE_REQUEST and
 * SLEEP_REQUEST (from the wake line or the caller) repeated with the same seq until the gateway
 * ACKs them; POWER_DOWN_ALLOWED (cut the gateway's supply after a delay) and NEXT_WAKE (power it
 * and send WAKE_REQUEST reason timer at a time), both ACKed. Bare-metal: no heap, no OS, no blocking; the UART receive interrupt calls
 * mcu_app_rx_byte() and the main loop calls mcu_app_poll().
 */
#ifndef MCU_APP_H
#define MCU_APP_H

#include <stdbool.h>
#include <stdint.h>

#include "mcu_hal.h"
#include "mcu_proto.h"
#include "mcu_ring.h"

typedef struct {
    uint32_t heartbeat_interval_ms; /* HEARTBEAT period (protocol: 100 ms .. 1 s) */
    uint32_t readings_interval_ms;  /* READINGS period (protocol: e.g. 200 ms) */
    uint32_t request_retry_ms;      /* repeat an un-ACKed wake/sleep request after this */
    uint32_t request_max_tries;     /* 0: repeat until ACKed (the protocol's rule) */
    uint32_t rail_reset_off_ms;     /* RAIL_COMMAND RESET: how long the rail stays off */
    uint32_t wake_line_debounce_ms; /* the wake line must hold a level this long */
    uint8_t wake_line_reason;       /* reason sent when the wake line asserts */
    bool wake_line_sleep_on_release;/* SLEEP_REQUEST when the line releases (a level, not a button) */
    uint16_t low_battery_mv;        /* HEARTBEAT LOW_BATTERY below this */
    int16_t over_temperature_dc;    /* HEARTBEAT OVER_TEMPERATURE above this (MCU or accelerator) */
    bool watchdog_reset;            /* the MCU came up from its own watchdog (reset cause register) */
} mcu_app_config_t;

/* Defaults: heartbeat 200 ms, readings 200 ms, retry 500 ms until ACKed, reset 100 ms off,
 * debounce 20 ms, wake line reason CAN activity, sleep on release, 11.5 V, 95 degC. */
void mcu_app_default_config(mcu_app_config_t *cfg);

typedef enum {
    MCU_EV_RAIL,           /* a RAIL_COMMAND was handled: action, seq, code (0xFF = ACKed) */
    MCU_EV_REQUEST_SENT,   /* a wake/sleep request went out: type, seq, reason, tries */
    MCU_EV_REQUEST_ACKED,  /* the gateway ACKed it: type, seq, tries */
    MCU_EV_REQUEST_GIVEN_UP,
    MCU_EV_WAKE_LINE,      /* the debounced wake line changed: level */
    MCU_EV_POWER_DOWN,     /* POWER_DOWN_ALLOWED taken: level = allow, value = after_s, reason, seq */
    MCU_EV_NEXT_WAKE,      /* NEXT_WAKE taken: value = wake_in_s (0 = cancelled), reason, seq */
    MCU_EV_GATEWAY_POWER   /* the gateway's supply switched: level = on, reason */
} mcu_event_kind_t;

typedef struct {
    mcu_event_kind_t kind;
    uint8_t type;   /* message type of the request (WAKE/SLEEP) */
    uint8_t seq;
    uint8_t action; /* rail action */
    uint8_t code;   /* NACK code, 0xFF = ACK */
    uint8_t reason;
    bool level;
    bool rail_on;   /* rail state after the event */
    uint32_t tries;
    uint32_t value; /* after_s / wake_in_s */
} mcu_event_t;

typedef void (*mcu_on_event_t)(void *ctx, const mcu_event_t *ev);

typedef struct {
    uint32_t frames_tx;
    uint32_t tx_short;        /* frames the UART did not take whole */
    uint32_t rail_commands;
    uint32_t nacks_sent;
    uint32_t requests;        /* wake/sleep requests started */
    uint32_t request_repeats; /* re-sent because no ACK came in time */
    uint32_t requests_acked;
    uint32_t requests_superseded; /* a newer request replaced an un-ACKed one */
    uint32_t requests_given_up;
    uint32_t sensor_errors;   /* READINGS not sent because a measurement failed */
    uint32_t acks_unmatched;  /* ACK/NACK for nothing we wait for */
    uint32_t power_commands;  /* POWER_DOWN_ALLOWED frames received (repeats included) */
    uint32_t next_wakes;      /* NEXT_WAKE frames received (repeats included) */
    uint32_t command_repeats; /* of those, repeats (same seq and payload): ACKed, not re-applied */
    uint32_t gateway_cuts;    /* times the gateway's supply was cut */
    uint32_t timer_wakes;     /* NEXT_WAKE times reached */
} mcu_app_counters_t;

typedef struct {
    const mcu_hal_t *hal;
    mcu_app_config_t cfg;
    mcu_ring_t rx;
    mcu_parser_t parser;
    mcu_app_counters_t counters;
    mcu_on_event_t on_event;
    void *event_ctx;

    uint8_t tx_seq;
    uint32_t start_ms;
    uint32_t next_heartbeat;
    uint32_t next_readings;
    bool rail_on;
    mcu_readings_t last; /* latest measurement (for the HEARTBEAT flags) */
    bool have_last;

    bool resetting; /* a RESET is in progress: rail off until reset_until */
    uint32_t reset_until;
    uint8_t reset_seq;

    bool req_pending;
    uint8_t req_type;
    uint8_t req_seq;
    uint8_t req_reason;
    uint32_t req_next;
    uint32_t req_tries;

    bool wl_stable;
    bool wl_candidate;
    uint32_t wl_since;

    bool gateway_off;        /* we cut the gateway's supply */
    bool pd_pending;         /* a cut is scheduled at pd_at */
    uint32_t pd_at;
    uint8_t pd_reason;
    bool pd_seen;            /* the last POWER_DOWN_ALLOWED (to ACK a repeat without re-applying) */
    uint8_t pd_seq;
    mcu_power_down_t pd_last;
    bool wake_pending;       /* a NEXT_WAKE is due at wake_at */
    uint32_t wake_at;
    bool nw_seen;
    uint8_t nw_seq;
    mcu_next_wake_t nw_last;
} mcu_app_t;

/* `cfg` may be NULL for the defaults. The rail starts off (rail_set(false) is called). */
void mcu_app_init(mcu_app_t *app, const mcu_hal_t *hal, const mcu_app_config_t *cfg);
void mcu_app_set_event_hook(mcu_app_t *app, mcu_on_event_t hook, void *ctx);

/* UART receive interrupt: one received byte (only pushes into the ring). */
void mcu_app_rx_byte(mcu_app_t *app, uint8_t byte);

/* Main loop: parse what was received, handle commands, send what is due. Never blocks. */
void mcu_app_poll(mcu_app_t *app);

/* Ask the gateway to wake (wake = true) or allows it to sleep, with a reason code. Replaces a
 * request still waiting for its ACK. */
void mcu_app_request(mcu_app_t *app, bool wake, uint8_t reason);

/* Milliseconds until mcu_app_poll() has something to do by itself (for WFI / poll timeouts);
 * received bytes are extra work the caller sees anyway. */
uint32_t mcu_app_idle_ms(const mcu_app_t *app);

/* Send one frame now (next seq); returns its seq. For the application and for tests. */
uint8_t mcu_app_send(mcu_app_t *app, mcu_msg_t *msg);

#endif /* MCU_APP_H */
