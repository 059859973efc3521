/* SPDX-License-Identifier: Apache-2.0 */
#include "mcu_app.h"

#include <string.h>

/* a is at or after b, modulo 2^32 (valid for differences below 2^31 ms, about 24 days). */
static bool due(uint32_t now, uint32_t deadline)
{
    return (uint32_t)(now - deadline) < 0x80000000u;
}

static uint32_t until(uint32_t now, uint32_t deadline)
{
    return due(now, deadline) ? 0u : (uint32_t)(deadline - now);
}

void mcu_app_default_config(mcu_app_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->heartbeat_interval_ms = 200;
    cfg->readings_interval_ms = 200;
    cfg->request_retry_ms = 500;
    cfg->request_max_tries = 0;
    cfg->rail_reset_off_ms = 100;
    cfg->wake_line_debounce_ms = 20;
    cfg->wake_line_reason = MCU_REASON_CAN_ACTIVITY;
    cfg->wake_line_sleep_on_release = true;
    cfg->low_battery_mv = 11500;
    cfg->over_temperature_dc = 950;
    cfg->watchdog_reset = false;
}

static uint32_t now_ms(const mcu_app_t *app)
{
    return app->hal->millis(app->hal->ctx);
}

static void emit(mcu_app_t *app, const mcu_event_t *ev)
{
    if (app->on_event != NULL) {
        app->on_event(app->event_ctx, ev);
    }
}

static uint8_t send_with_seq(mcu_app_t *app, mcu_msg_t *msg, uint8_t seq)
{
    uint8_t frame[MCU_MAX_FRAME];
    size_t len;
    msg->seq = seq;
    len = mcu_encode(frame, msg);
    if (len == 0) {
        return seq;
    }
    if (app->hal->uart_write(app->hal->ctx, frame, len) != len) {
        app->counters.tx_short++;
    }
    app->counters.frames_tx++;
    return seq;
}

uint8_t mcu_app_send(mcu_app_t *app, mcu_msg_t *msg)
{
    app->tx_seq = (uint8_t)(app->tx_seq + 1u);
    return send_with_seq(app, msg, app->tx_seq);
}

static void send_reply(mcu_app_t *app, uint8_t acked_seq, uint8_t acked_type, bool ok, uint8_t code)
{
    mcu_msg_t msg;
    memset(&msg, 0, sizeof msg);
    msg.type = ok ? MCU_T_ACK : MCU_T_NACK;
    msg.u.ack.acked_seq = acked_seq;
    msg.u.ack.acked_type = acked_type;
    msg.u.ack.code = code;
    if (!ok) {
        app->counters.nacks_sent++;
    }
    mcu_app_send(app, &msg);
}

static uint16_t clamp_u16(int32_t v)
{
    return v < 0 ? 0u : v > 65535 ? 65535u : (uint16_t)v;
}

static int16_t clamp_i16(int32_t v)
{
    return v < -32768 ? (int16_t)-32768 : v > 32767 ? (int16_t)32767 : (int16_t)v;
}

/* Measure everything; false (counted) when a measurement failed. */
static bool measure(mcu_app_t *app, mcu_readings_t *r)
{
    int32_t v[MCU_SENSE_COUNT];
    int i;
    for (i = 0; i < (int)MCU_SENSE_COUNT; i++) {
        if (!app->hal->sense(app->hal->ctx, (mcu_sense_t)i, &v[i])) {
            app->counters.sensor_errors++;
            return false;
        }
    }
    r->battery_mv = clamp_u16(v[MCU_SENSE_BATTERY_MV]);
    r->mcu_temp_dc = clamp_i16(v[MCU_SENSE_MCU_TEMP_DC]);
    r->accel_temp_dc = clamp_i16(v[MCU_SENSE_ACCEL_TEMP_DC]);
    r->rail_mv = clamp_u16(v[MCU_SENSE_RAIL_MV]);
    r->rail_ma = clamp_u16(v[MCU_SENSE_RAIL_MA]);
    /* 65535 * 65535 < 2^32: no overflow. */
    r->rail_mw = ((uint32_t)r->rail_mv * (uint32_t)r->rail_ma) / 1000u;
    r->rail_on = app->rail_on ? 1u : 0u;
    return true;
}

static void send_readings(mcu_app_t *app)
{
    mcu_msg_t msg;
    memset(&msg, 0, sizeof msg);
    msg.type = MCU_T_READINGS;
    if (!measure(app, &msg.u.readings)) {
        return;
    }
    app->last = msg.u.readings;
    app->have_last = true;
    mcu_app_send(app, &msg);
}

static void send_heartbeat(mcu_app_t *app, uint32_t now)
{
    mcu_msg_t msg;
    uint16_t status = 0;
    const mcu_hal_t *hal = app->hal;
    if (hal->ignition != NULL && hal->ignition(hal->ctx)) {
        status |= MCU_STATUS_IGNITION_ON;
    }
    if (app->rail_on) {
        status |= MCU_STATUS_RAIL_ON;
    }
    if (app->have_last) {
        if (app->last.battery_mv < app->cfg.low_battery_mv) {
            status |= MCU_STATUS_LOW_BATTERY;
        }
        if (app->last.mcu_temp_dc > app->cfg.over_temperature_dc
            || app->last.accel_temp_dc > app->cfg.over_temperature_dc) {
            status |= MCU_STATUS_OVER_TEMPERATURE;
        }
    }
    if (app->cfg.watchdog_reset) {
        status |= MCU_STATUS_WATCHDOG_RESET;
    }
    memset(&msg, 0, sizeof msg);
    msg.type = MCU_T_HEARTBEAT;
    msg.u.heartbeat.uptime_ms = (uint32_t)(now - app->start_ms);
    msg.u.heartbeat.status = status;
    mcu_app_send(app, &msg);
}

static void rail_event(mcu_app_t *app, uint8_t action, uint8_t seq, uint8_t code)
{
    mcu_event_t ev;
    memset(&ev, 0, sizeof ev);
    ev.kind = MCU_EV_RAIL;
    ev.action = action;
    ev.seq = seq;
    ev.code = code;
    ev.rail_on = app->rail_on;
    emit(app, &ev);
}

/* Switch and answer: ACK then READINGS with the new state, or NACK FAULT. */
static void finish_rail(mcu_app_t *app, uint8_t action, uint8_t seq, bool on)
{
    bool ok = app->hal->rail_set(app->hal->ctx, on);
    if (ok) {
        app->rail_on = on;
        send_reply(app, seq, MCU_T_RAIL_COMMAND, true, 0);
    } else {
        /* The rail did not reach the commanded state: it is still in the other one. */
        app->rail_on = !on;
        send_reply(app, seq, MCU_T_RAIL_COMMAND, false, MCU_NACK_FAULT);
    }
    send_readings(app);
    app->next_readings = now_ms(app) + app->cfg.readings_interval_ms;
    rail_event(app, action, seq, ok ? 0xFFu : MCU_NACK_FAULT);
}

static void on_rail_command(mcu_app_t *app, uint8_t seq, uint8_t action)
{
    app->counters.rail_commands++;
    if (app->resetting) {
        send_reply(app, seq, MCU_T_RAIL_COMMAND, false, MCU_NACK_BUSY);
        rail_event(app, action, seq, MCU_NACK_BUSY);
        return;
    }
    if (action == MCU_RAIL_RESET) {
        /* Power cycle without blocking: off now, on (and the ACK) when the off time is over. */
        (void)app->hal->rail_set(app->hal->ctx, false);
        app->rail_on = false;
        app->resetting = true;
        app->reset_seq = seq;
        app->reset_until = now_ms(app) + app->cfg.rail_reset_off_ms;
        return;
    }
    finish_rail(app, action, seq, action == MCU_RAIL_ON);
}

static void on_ack(mcu_app_t *app, const mcu_msg_t *msg)
{
    mcu_event_t ev;
    if (!app->req_pending || msg->u.ack.acked_seq != app->req_seq
        || msg->u.ack.acked_type != app->req_type) {
        app->counters.acks_unmatched++;
        return;
    }
    /* ACK means "received", not "granted"; a NACK is an answer too: stop repeating. */
    app->req_pending = false;
    app->counters.requests_acked++;
    memset(&ev, 0, sizeof ev);
    ev.kind = MCU_EV_REQUEST_ACKED;
    ev.type = app->req_type;
    ev.seq = app->req_seq;
    ev.reason = app->req_reason;
    ev.tries = app->req_tries;
    emit(app, &ev);
}

static void gateway_power(mcu_app_t *app, bool on, uint8_t reason)
{
    mcu_event_t ev;
    app->gateway_off = !on;
    if (!on) {
        app->counters.gateway_cuts++;
    }
    if (app->hal->gateway_power != NULL) {
        app->hal->gateway_power(app->hal->ctx, on);
    }
    memset(&ev, 0, sizeof ev);
    ev.kind = MCU_EV_GATEWAY_POWER;
    ev.level = on;
    ev.reason = reason;
    emit(app, &ev);
}

/* POWER_DOWN_ALLOWED: ACK; allow schedules the cut after after_s, 0 cancels it. A repeat (same seq
 * and payload: the gateway did not see our ACK) is ACKed again and changes nothing. */
static void on_power_down(mcu_app_t *app, const mcu_msg_t *msg)
{
    const mcu_power_down_t *pd = &msg->u.power_down;
    mcu_event_t ev;
    app->counters.power_commands++;
    send_reply(app, msg->seq, MCU_T_POWER_DOWN_ALLOWED, true, 0);
    if (app->pd_seen && app->pd_seq == msg->seq && app->pd_last.allow == pd->allow
        && app->pd_last.after_s == pd->after_s && app->pd_last.reason == pd->reason) {
        app->counters.command_repeats++;
        return;
    }
    app->pd_seen = true;
    app->pd_seq = msg->seq;
    app->pd_last = *pd;
    app->pd_pending = pd->allow != 0u;
    app->pd_reason = pd->reason;
    app->pd_at = now_ms(app) + (uint32_t)pd->after_s * 1000u;
    memset(&ev, 0, sizeof ev);
    ev.kind = MCU_EV_POWER_DOWN;
    ev.seq = msg->seq;
    ev.level = pd->allow != 0u;
    ev.value = pd->after_s;
    ev.reason = pd->reason;
    emit(app, &ev);
}

/* NEXT_WAKE: ACK; schedule (or with 0 cancel) the wake. Repeats as for POWER_DOWN_ALLOWED. */
static void on_next_wake(mcu_app_t *app, const mcu_msg_t *msg)
{
    const mcu_next_wake_t *nw = &msg->u.next_wake;
    mcu_event_t ev;
    app->counters.next_wakes++;
    send_reply(app, msg->seq, MCU_T_NEXT_WAKE, true, 0);
    if (app->nw_seen && app->nw_seq == msg->seq && app->nw_last.wake_in_s == nw->wake_in_s
        && app->nw_last.reason == nw->reason) {
        app->counters.command_repeats++;
        return;
    }
    app->nw_seen = true;
    app->nw_seq = msg->seq;
    app->nw_last = *nw;
    app->wake_pending = nw->wake_in_s != 0u;
    /* wake_in_s <= MCU_MAX_WAKE_IN_S (the decoder checks): the product stays below 2^31. */
    app->wake_at = now_ms(app) + nw->wake_in_s * 1000u;
    memset(&ev, 0, sizeof ev);
    ev.kind = MCU_EV_NEXT_WAKE;
    ev.seq = msg->seq;
    ev.value = nw->wake_in_s;
    ev.reason = nw->reason;
    emit(app, &ev);
}

static void poll_power(mcu_app_t *app, uint32_t now)
{
    const mcu_hal_t *hal = app->hal;
    bool ignition = hal->ignition != NULL && hal->ignition(hal->ctx);
    if (ignition) {
        /* The key is on: the gateway must run, whatever it allowed before. */
        app->pd_pending = false;
        if (app->gateway_off) {
            gateway_power(app, true, MCU_REASON_IGNITION);
        }
    }
    if (app->pd_pending && due(now, app->pd_at)) {
        app->pd_pending = false;
        if (!app->gateway_off) {
            gateway_power(app, false, app->pd_reason);
        }
    }
    if (app->wake_pending && due(now, app->wake_at)) {
        app->wake_pending = false;
        app->counters.timer_wakes++;
        if (app->gateway_off) {
            gateway_power(app, true, MCU_REASON_TIMER);
        }
        mcu_app_request(app, true, MCU_REASON_TIMER);
    }
}

static void on_msg(void *ctx, const mcu_msg_t *msg)
{
    mcu_app_t *app = (mcu_app_t *)ctx;
    switch (msg->type) {
    case MCU_T_RAIL_COMMAND:
        on_rail_command(app, msg->seq, msg->u.rail.action);
        break;
    case MCU_T_POWER_DOWN_ALLOWED:
        on_power_down(app, msg);
        break;
    case MCU_T_NEXT_WAKE:
        on_next_wake(app, msg);
        break;
    case MCU_T_ACK:
    case MCU_T_NACK:
        on_ack(app, msg);
        break;
    default:
        break; /* MCU -> gateway messages echoed back: nothing to do */
    }
}

static void on_reject(void *ctx, mcu_result_t kind, uint8_t type, uint8_t seq)
{
    mcu_app_t *app = (mcu_app_t *)ctx;
    /* A RAIL_COMMAND with a good CRC but a bad action or size: tell the gateway at once
     * instead of letting it wait for its ACK timeout. */
    if ((type == MCU_T_RAIL_COMMAND || type == MCU_T_POWER_DOWN_ALLOWED || type == MCU_T_NEXT_WAKE)
        && (kind == MCU_ERR_BAD_VALUE || kind == MCU_ERR_LENGTH)) {
        send_reply(app, seq, type, false, MCU_NACK_BAD_ARGUMENT);
    }
}

void mcu_app_init(mcu_app_t *app, const mcu_hal_t *hal, const mcu_app_config_t *cfg)
{
    uint32_t now;
    memset(app, 0, sizeof *app);
    app->hal = hal;
    if (cfg != NULL) {
        app->cfg = *cfg;
    } else {
        mcu_app_default_config(&app->cfg);
    }
    mcu_ring_init(&app->rx);
    mcu_parser_init(&app->parser, on_msg, on_reject, app);
    (void)hal->rail_set(hal->ctx, false);
    now = hal->millis(hal->ctx);
    app->start_ms = now;
    app->next_heartbeat = now;
    app->next_readings = now;
    app->wl_since = now;
}

void mcu_app_set_event_hook(mcu_app_t *app, mcu_on_event_t hook, void *ctx)
{
    app->on_event = hook;
    app->event_ctx = ctx;
}

void mcu_app_rx_byte(mcu_app_t *app, uint8_t byte)
{
    (void)mcu_ring_push(&app->rx, byte);
}

static void send_request(mcu_app_t *app, uint32_t now)
{
    mcu_msg_t msg;
    mcu_event_t ev;
    memset(&msg, 0, sizeof msg);
    msg.type = app->req_type;
    msg.u.request.reason = app->req_reason;
    (void)send_with_seq(app, &msg, app->req_seq); /* repeats keep their seq */
    app->req_tries++;
    app->req_next = now + app->cfg.request_retry_ms;
    memset(&ev, 0, sizeof ev);
    ev.kind = MCU_EV_REQUEST_SENT;
    ev.type = app->req_type;
    ev.seq = app->req_seq;
    ev.reason = app->req_reason;
    ev.tries = app->req_tries;
    emit(app, &ev);
}

void mcu_app_request(mcu_app_t *app, bool wake, uint8_t reason)
{
    if (app->req_pending) {
        app->counters.requests_superseded++;
    }
    app->counters.requests++;
    app->req_pending = true;
    app->req_type = wake ? MCU_T_WAKE_REQUEST : MCU_T_SLEEP_REQUEST;
    app->req_reason = reason;
    app->tx_seq = (uint8_t)(app->tx_seq + 1u);
    app->req_seq = app->tx_seq;
    app->req_tries = 0;
    send_request(app, now_ms(app));
}

static void poll_wake_line(mcu_app_t *app, uint32_t now)
{
    bool level;
    mcu_event_t ev;
    if (app->hal->wake_line == NULL) {
        return;
    }
    level = app->hal->wake_line(app->hal->ctx);
    if (level != app->wl_candidate) {
        app->wl_candidate = level;
        app->wl_since = now;
    }
    if (app->wl_candidate == app->wl_stable || !due(now, app->wl_since + app->cfg.wake_line_debounce_ms)) {
        return;
    }
    app->wl_stable = app->wl_candidate;
    memset(&ev, 0, sizeof ev);
    ev.kind = MCU_EV_WAKE_LINE;
    ev.level = app->wl_stable;
    emit(app, &ev);
    if (app->wl_stable) {
        mcu_app_request(app, true, app->cfg.wake_line_reason);
    } else if (app->cfg.wake_line_sleep_on_release) {
        mcu_app_request(app, false, MCU_REASON_UNSPECIFIED);
    }
}

void mcu_app_poll(mcu_app_t *app)
{
    uint8_t byte;
    uint32_t now;

    while (mcu_ring_pop(&app->rx, &byte)) {
        mcu_parser_push(&app->parser, byte);
    }
    now = now_ms(app);
    if (app->resetting && due(now, app->reset_until)) {
        app->resetting = false;
        finish_rail(app, MCU_RAIL_RESET, app->reset_seq, true);
    }
    if (app->req_pending && due(now, app->req_next)) {
        if (app->cfg.request_max_tries != 0 && app->req_tries >= app->cfg.request_max_tries) {
            mcu_event_t ev;
            app->req_pending = false;
            app->counters.requests_given_up++;
            memset(&ev, 0, sizeof ev);
            ev.kind = MCU_EV_REQUEST_GIVEN_UP;
            ev.type = app->req_type;
            ev.seq = app->req_seq;
            ev.tries = app->req_tries;
            emit(app, &ev);
        } else {
            app->counters.request_repeats++;
            send_request(app, now);
        }
    }
    poll_wake_line(app, now);
    poll_power(app, now);
    if (due(now, app->next_readings)) {
        send_readings(app); /* first, so the first HEARTBEAT already has the flags */
        app->next_readings += app->cfg.readings_interval_ms;
        if (due(now, app->next_readings)) { /* after a stall: no burst of catch-up frames */
            app->next_readings = now + app->cfg.readings_interval_ms;
        }
    }
    if (due(now, app->next_heartbeat)) {
        send_heartbeat(app, now);
        app->next_heartbeat += app->cfg.heartbeat_interval_ms;
        if (due(now, app->next_heartbeat)) {
            app->next_heartbeat = now + app->cfg.heartbeat_interval_ms;
        }
    }
}

uint32_t mcu_app_idle_ms(const mcu_app_t *app)
{
    uint32_t now = now_ms(app);
    uint32_t idle = until(now, app->next_heartbeat);
    uint32_t t = until(now, app->next_readings);
    if (t < idle) {
        idle = t;
    }
    if (app->req_pending && (t = until(now, app->req_next)) < idle) {
        idle = t;
    }
    if (app->resetting && (t = until(now, app->reset_until)) < idle) {
        idle = t;
    }
    if (app->pd_pending && (t = until(now, app->pd_at)) < idle) {
        idle = t;
    }
    if (app->wake_pending && (t = until(now, app->wake_at)) < idle) {
        idle = t;
    }
    if (app->hal->wake_line != NULL) {
        /* The line is sampled, not interrupt-driven here: look at it at least this often. */
        uint32_t sample = app->cfg.wake_line_debounce_ms ? app->cfg.wake_line_debounce_ms : 10u;
        if (sample < idle) {
            idle = sample;
        }
    }
    return idle;
}
