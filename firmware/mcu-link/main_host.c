/* SPDX-License-Identifier: Apache-2.0
 *
 * Host (POSIX) port of the companion-MCU firmware: the same mcu_app as on the MCU, with the
 * UART on a pty (or an inherited file descriptor), a millisecond clock from CLOCK_MONOTONIC and
 * a simulated board (battery, temperatures, an accelerator rail with a load switch, a wake line
 * and an ignition input). Controlled by lines on stdin; reports events as JSON lines on stdout.
 *
 *   mcu-link-host [--pty LINK | --fd N] [options]     (--help lists them)
 *
 * stdin commands:
 *   wake R | sleep R           start a WAKE_REQUEST / SLEEP_REQUEST with reason R
 *   wakeline 0|1               set the wake line level (debounced; 1 = WAKE_REQUEST)
 *   ignition 0|1               set the ignition input (HEARTBEAT flag; on powers the gateway, cancels a cut)
 *   set NAME VALUE             battery_mv, mcu_temp_dc, accel_temp_dc, rail_mv, rail_ma (rail on)
 *   fault 0|1                  the load switch fails to reach the commanded state
 *   sensorfail 0|1             every measurement fails (no READINGS)
 *   silent 0|1                 transmit nothing (the link goes stale on the gateway)
 *   garbage N [SEED]           write N pseudo-random bytes (any value) to the line
 *   noise N                    write N bytes that never contain 0xA5 (counted exactly as garbage)
 *   badcrc                     write one READINGS frame with a corrupted CRC
 *   stats                      print the counters
 *   quit                       exit (end of stdin exits too)
 */
#define _XOPEN_SOURCE 700

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "mcu_app.h"

typedef struct {
    int fd;
    bool silent;
    bool fault;
    bool sensor_fail;
    bool rail_on;
    bool wake_line;
    bool ignition;
    bool gateway_on; /* the simulated gateway's supply */
    int32_t battery_mv;
    int32_t mcu_temp_dc;
    int32_t accel_temp_dc;
    int32_t rail_mv; /* while on */
    int32_t rail_ma; /* while on */
    unsigned long tx_dropped;
    unsigned long rx_bytes;
} board_t;

/* -- HAL --------------------------------------------------------------------------------- */

static size_t write_line(board_t *b, const uint8_t *data, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(b->fd, data + done, len - done);
        if (n > 0) {
            done += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            /* Nobody drains the other side and its buffer is full: a UART would lose them too. */
            b->tx_dropped += (unsigned long)(len - done);
            break;
        }
    }
    return done;
}

static size_t hal_uart_write(void *ctx, const uint8_t *data, size_t len)
{
    board_t *b = (board_t *)ctx;
    if (b->silent) {
        return len; /* as if the transmitter were cut: nothing reaches the line */
    }
    return write_line(b, data, len);
}

static uint32_t hal_millis(void *ctx)
{
    struct timespec ts;
    (void)ctx;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((unsigned long long)ts.tv_sec * 1000ull + (unsigned long long)ts.tv_nsec / 1000000ull);
}

static bool hal_sense(void *ctx, mcu_sense_t what, int32_t *value)
{
    board_t *b = (board_t *)ctx;
    if (b->sensor_fail) {
        return false;
    }
    switch (what) {
    case MCU_SENSE_BATTERY_MV: *value = b->battery_mv; break;
    case MCU_SENSE_MCU_TEMP_DC: *value = b->mcu_temp_dc; break;
    case MCU_SENSE_ACCEL_TEMP_DC: *value = b->accel_temp_dc; break;
    case MCU_SENSE_RAIL_MV: *value = b->rail_on ? b->rail_mv : 0; break;
    case MCU_SENSE_RAIL_MA: *value = b->rail_on ? b->rail_ma : 0; break;
    default: return false;
    }
    return true;
}

static bool hal_rail_set(void *ctx, bool on)
{
    board_t *b = (board_t *)ctx;
    if (b->fault) {
        return false; /* the load switch does not move */
    }
    b->rail_on = on;
    return true;
}

static bool hal_wake_line(void *ctx)
{
    return ((board_t *)ctx)->wake_line;
}

static bool hal_ignition(void *ctx)
{
    return ((board_t *)ctx)->ignition;
}

static void hal_gateway_power(void *ctx, bool on)
{
    ((board_t *)ctx)->gateway_on = on;
}

/* -- events ------------------------------------------------------------------------------ */

static const char *type_name(uint8_t type)
{
    return type == MCU_T_WAKE_REQUEST ? "wake" : type == MCU_T_SLEEP_REQUEST ? "sleep" : "?";
}

static const char *action_name(uint8_t action)
{
    return action == MCU_RAIL_OFF ? "off" : action == MCU_RAIL_ON ? "on" : action == MCU_RAIL_RESET ? "reset" : "?";
}

static void on_event(void *ctx, const mcu_event_t *ev)
{
    (void)ctx;
    switch (ev->kind) {
    case MCU_EV_RAIL:
        printf("{\"event\": \"rail\", \"action\": \"%s\", \"seq\": %u, \"result\": \"%s\", \"rail_on\": %s}\n",
               action_name(ev->action), ev->seq,
               ev->code == 0xFFu ? "ack" : ev->code == MCU_NACK_BUSY ? "busy" : "fault",
               ev->rail_on ? "true" : "false");
        break;
    case MCU_EV_REQUEST_SENT:
        printf("{\"event\": \"request_sent\", \"kind\": \"%s\", \"seq\": %u, \"reason\": %u, \"tries\": %lu}\n",
               type_name(ev->type), ev->seq, ev->reason, (unsigned long)ev->tries);
        break;
    case MCU_EV_REQUEST_ACKED:
        printf("{\"event\": \"request_acked\", \"kind\": \"%s\", \"seq\": %u, \"reason\": %u, \"tries\": %lu}\n",
               type_name(ev->type), ev->seq, ev->reason, (unsigned long)ev->tries);
        break;
    case MCU_EV_REQUEST_GIVEN_UP:
        printf("{\"event\": \"request_given_up\", \"kind\": \"%s\", \"seq\": %u, \"tries\": %lu}\n",
               type_name(ev->type), ev->seq, (unsigned long)ev->tries);
        break;
    case MCU_EV_WAKE_LINE:
        printf("{\"event\": \"wake_line\", \"level\": %d}\n", ev->level ? 1 : 0);
        break;
    case MCU_EV_POWER_DOWN:
        printf("{\"event\": \"power_down\", \"allow\": %d, \"after_s\": %lu, \"reason\": %u, \"seq\": %u}\n",
               ev->level ? 1 : 0, (unsigned long)ev->value, ev->reason, ev->seq);
        break;
    case MCU_EV_NEXT_WAKE:
        printf("{\"event\": \"next_wake\", \"wake_in_s\": %lu, \"reason\": %u, \"seq\": %u}\n",
               (unsigned long)ev->value, ev->reason, ev->seq);
        break;
    case MCU_EV_GATEWAY_POWER:
        printf("{\"event\": \"gateway_power\", \"on\": %s, \"reason\": %u}\n", ev->level ? "true" : "false",
               ev->reason);
        break;
    }
    fflush(stdout);
}

static void print_stats(const mcu_app_t *app, const board_t *b)
{
    const mcu_counters_t *c = &app->parser.counters;
    const mcu_app_counters_t *a = &app->counters;
    printf("{\"event\": \"stats\", \"rx_bytes\": %lu, \"frames\": %lu, \"crc\": %lu, \"length\": %lu, "
           "\"version\": %lu, \"unknown_type\": %lu, \"bad_value\": %lu, \"garbage_bytes\": %lu, "
           "\"frames_tx\": %lu, \"tx_short\": %lu, \"tx_dropped\": %lu, \"rail_commands\": %lu, "
           "\"nacks_sent\": %lu, \"requests\": %lu, \"request_repeats\": %lu, \"requests_acked\": %lu, "
           "\"sensor_errors\": %lu, \"acks_unmatched\": %lu, \"ring_overruns\": %lu, \"rail_on\": %s, "
           "\"power_commands\": %lu, \"next_wakes\": %lu, \"command_repeats\": %lu, \"gateway_cuts\": %lu, "
           "\"timer_wakes\": %lu, \"gateway_on\": %s}\n",
           b->rx_bytes, (unsigned long)c->frames, (unsigned long)c->crc, (unsigned long)c->length,
           (unsigned long)c->version, (unsigned long)c->unknown_type, (unsigned long)c->bad_value,
           (unsigned long)c->garbage_bytes, (unsigned long)a->frames_tx, (unsigned long)a->tx_short,
           b->tx_dropped, (unsigned long)a->rail_commands, (unsigned long)a->nacks_sent,
           (unsigned long)a->requests, (unsigned long)a->request_repeats, (unsigned long)a->requests_acked,
           (unsigned long)a->sensor_errors, (unsigned long)a->acks_unmatched,
           (unsigned long)app->rx.overruns, b->rail_on ? "true" : "false", (unsigned long)a->power_commands,
           (unsigned long)a->next_wakes, (unsigned long)a->command_repeats, (unsigned long)a->gateway_cuts,
           (unsigned long)a->timer_wakes, b->gateway_on ? "true" : "false");
    fflush(stdout);
}

/* -- control ----------------------------------------------------------------------------- */

static uint32_t xorshift(uint32_t *s)
{
    uint32_t x = *s ? *s : 0x9E3779B9u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *s = x;
    return x;
}

static void inject(board_t *b, unsigned long n, uint32_t seed, bool avoid_sof)
{
    uint8_t chunk[64];
    while (n > 0) {
        size_t i, len = n < sizeof chunk ? (size_t)n : sizeof chunk;
        for (i = 0; i < len; i++) {
            uint8_t v = (uint8_t)(xorshift(&seed) >> 24);
            chunk[i] = (avoid_sof && v == MCU_SOF0) ? 0x00u : v;
        }
        (void)write_line(b, chunk, len);
        n -= len;
    }
}

static void bad_crc(mcu_app_t *app, board_t *b)
{
    uint8_t frame[MCU_MAX_FRAME];
    mcu_msg_t msg;
    size_t len;
    memset(&msg, 0, sizeof msg);
    msg.type = MCU_T_READINGS;
    msg.u.readings = app->last;
    len = mcu_encode(frame, &msg);
    frame[len - 1] ^= 0x5Au;
    (void)write_line(b, frame, len);
}

/* Returns false on quit. */
static bool command(mcu_app_t *app, board_t *b, char *line)
{
    char *word = strtok(line, " \t\r\n");
    char *arg1 = strtok(NULL, " \t\r\n");
    char *arg2 = strtok(NULL, " \t\r\n");
    long v1 = arg1 ? strtol(arg1, NULL, 0) : 0;
    long v2 = arg2 ? strtol(arg2, NULL, 0) : 0;
    if (word == NULL) {
        return true;
    }
    if (strcmp(word, "quit") == 0) {
        return false;
    } else if (strcmp(word, "wake") == 0 || strcmp(word, "sleep") == 0) {
        mcu_app_request(app, word[0] == 'w', (uint8_t)v1);
    } else if (strcmp(word, "wakeline") == 0) {
        b->wake_line = v1 != 0;
    } else if (strcmp(word, "ignition") == 0) {
        b->ignition = v1 != 0;
    } else if (strcmp(word, "fault") == 0) {
        b->fault = v1 != 0;
    } else if (strcmp(word, "sensorfail") == 0) {
        b->sensor_fail = v1 != 0;
    } else if (strcmp(word, "silent") == 0) {
        b->silent = v1 != 0;
    } else if (strcmp(word, "garbage") == 0) {
        inject(b, (unsigned long)v1, arg2 ? (uint32_t)v2 : 1u, false);
    } else if (strcmp(word, "noise") == 0) {
        inject(b, (unsigned long)v1, 12345u, true);
    } else if (strcmp(word, "badcrc") == 0) {
        bad_crc(app, b);
    } else if (strcmp(word, "stats") == 0) {
        print_stats(app, b);
        return true;
    } else if (strcmp(word, "set") == 0 && arg1 != NULL && arg2 != NULL) {
        int32_t *field = strcmp(arg1, "battery_mv") == 0 ? &b->battery_mv
                       : strcmp(arg1, "mcu_temp_dc") == 0 ? &b->mcu_temp_dc
                       : strcmp(arg1, "accel_temp_dc") == 0 ? &b->accel_temp_dc
                       : strcmp(arg1, "rail_mv") == 0 ? &b->rail_mv
                       : strcmp(arg1, "rail_ma") == 0 ? &b->rail_ma : NULL;
        if (field == NULL) {
            printf("{\"event\": \"error\", \"message\": \"unknown value %s\"}\n", arg1);
            fflush(stdout);
            return true;
        }
        *field = (int32_t)v2;
    } else {
        printf("{\"event\": \"error\", \"message\": \"unknown command %s\"}\n", word);
        fflush(stdout);
        return true;
    }
    printf("{\"event\": \"ok\", \"command\": \"%s\"}\n", word);
    fflush(stdout);
    return true;
}

/* -- setup ------------------------------------------------------------------------------- */

static void make_raw(int fd)
{
    struct termios t;
    if (tcgetattr(fd, &t) != 0) {
        return;
    }
    /* What cfmakeraw does (not in POSIX): no echo, no line editing, no translation, 8 bits. */
    t.c_iflag &= ~(tcflag_t)(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
    t.c_oflag &= ~(tcflag_t)OPOST;
    t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
    t.c_cflag &= ~(tcflag_t)(CSIZE | PARENB);
    t.c_cflag |= CS8;
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    (void)tcsetattr(fd, TCSANOW, &t);
}

/* A new pty: returns the master, keeps the slave open (so the master never sees a hang-up
 * while the gateway reconnects) and points `link` at the slave if given. */
static int open_pty(const char *link, char *path, size_t path_len, int *slave_out)
{
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    const char *name;
    int slave;
    if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0 || (name = ptsname(master)) == NULL) {
        perror("pty");
        return -1;
    }
    strncpy(path, name, path_len - 1);
    path[path_len - 1] = '\0';
    slave = open(path, O_RDWR | O_NOCTTY);
    if (slave < 0) {
        perror(path);
        return -1;
    }
    make_raw(slave);
    *slave_out = slave;
    if (link != NULL) {
        char tmp[4096];
        if (snprintf(tmp, sizeof tmp, "%s.new", link) >= (int)sizeof tmp) {
            fprintf(stderr, "link path too long\n");
            return -1;
        }
        (void)unlink(tmp);
        if (symlink(path, tmp) != 0 || rename(tmp, link) != 0) { /* atomic swap */
            perror(link);
            return -1;
        }
    }
    return master;
}

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s [--pty LINK | --fd N] [--heartbeat-ms MS] [--readings-ms MS] [--retry-ms MS]\n"
            "       [--max-tries N] [--reset-ms MS] [--debounce-ms MS] [--wake-reason R] [--battery-mv MV]\n"
            "       [--mcu-temp-dc T] [--accel-temp-dc T] [--rail-mv MV] [--rail-ma MA] [--ignition 0|1]\n"
            "       [--watchdog-reset]\n"
            "Without --pty LINK or --fd a pty is created; its path is in the first stdout line.\n",
            argv0);
}

int main(int argc, char **argv)
{
    static mcu_app_t app; /* static: no big objects on a small stack, as on the MCU */
    board_t board;
    mcu_hal_t hal;
    mcu_app_config_t cfg;
    const char *link = NULL;
    char path[256] = "";
    char line[512];
    size_t line_len = 0;
    int fd = -1, slave = -1, i;
    bool running = true, stdin_open = true;

    memset(&board, 0, sizeof board);
    board.battery_mv = 12600;
    board.mcu_temp_dc = 350;
    board.accel_temp_dc = 450;
    board.rail_mv = 5000;
    board.rail_ma = 1200;
    board.ignition = true;
    board.gateway_on = true;
    mcu_app_default_config(&cfg);

    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--watchdog-reset") == 0) {
            cfg.watchdog_reset = true;
            continue;
        }
        if (strcmp(a, "--help") == 0 || v == NULL) {
            usage(argv[0]);
            return strcmp(a, "--help") == 0 ? 0 : 2;
        }
        i++;
        if (strcmp(a, "--pty") == 0) link = v;
        else if (strcmp(a, "--fd") == 0) fd = atoi(v);
        else if (strcmp(a, "--heartbeat-ms") == 0) cfg.heartbeat_interval_ms = (uint32_t)atol(v);
        else if (strcmp(a, "--readings-ms") == 0) cfg.readings_interval_ms = (uint32_t)atol(v);
        else if (strcmp(a, "--retry-ms") == 0) cfg.request_retry_ms = (uint32_t)atol(v);
        else if (strcmp(a, "--max-tries") == 0) cfg.request_max_tries = (uint32_t)atol(v);
        else if (strcmp(a, "--reset-ms") == 0) cfg.rail_reset_off_ms = (uint32_t)atol(v);
        else if (strcmp(a, "--debounce-ms") == 0) cfg.wake_line_debounce_ms = (uint32_t)atol(v);
        else if (strcmp(a, "--wake-reason") == 0) cfg.wake_line_reason = (uint8_t)atoi(v);
        else if (strcmp(a, "--battery-mv") == 0) board.battery_mv = atoi(v);
        else if (strcmp(a, "--mcu-temp-dc") == 0) board.mcu_temp_dc = atoi(v);
        else if (strcmp(a, "--accel-temp-dc") == 0) board.accel_temp_dc = atoi(v);
        else if (strcmp(a, "--rail-mv") == 0) board.rail_mv = atoi(v);
        else if (strcmp(a, "--rail-ma") == 0) board.rail_ma = atoi(v);
        else if (strcmp(a, "--ignition") == 0) board.ignition = atoi(v) != 0;
        else {
            usage(argv[0]);
            return 2;
        }
    }
    if (fd < 0) {
        fd = open_pty(link, path, sizeof path, &slave);
        if (fd < 0) {
            return 1;
        }
    }
    (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    board.fd = fd;

    hal.ctx = &board;
    hal.uart_write = hal_uart_write;
    hal.millis = hal_millis;
    hal.sense = hal_sense;
    hal.rail_set = hal_rail_set;
    hal.wake_line = hal_wake_line;
    hal.ignition = hal_ignition;
    hal.gateway_power = hal_gateway_power;
    mcu_app_init(&app, &hal, &cfg);
    mcu_app_set_event_hook(&app, on_event, NULL);

    printf("{\"event\": \"ready\", \"path\": \"%s\", \"pid\": %ld}\n", path, (long)getpid());
    fflush(stdout);

    while (running) {
        struct pollfd fds[2];
        uint32_t idle = mcu_app_idle_ms(&app);
        int n;
        fds[0].fd = fd;
        fds[0].events = POLLIN;
        fds[0].revents = 0;
        fds[1].fd = STDIN_FILENO;
        fds[1].events = POLLIN;
        fds[1].revents = 0;
        n = poll(fds, stdin_open ? 2u : 1u, (int)(idle < 50u ? idle : 50u));
        if (n < 0 && errno != EINTR) {
            perror("poll");
            break;
        }
        if (n > 0 && (fds[0].revents & POLLIN)) {
            uint8_t buf[128]; /* below the ring size: the ring never overflows here */
            ssize_t got = read(fd, buf, sizeof buf);
            ssize_t k;
            for (k = 0; k < got; k++) {
                mcu_app_rx_byte(&app, buf[k]); /* what the UART interrupt does */
            }
            if (got > 0) {
                board.rx_bytes += (unsigned long)got;
            }
        } else if (n > 0 && (fds[0].revents & (POLLHUP | POLLERR))) {
            /* No reader on the other side (an --fd whose peer closed): wait a little. */
            struct timespec ts = {0, 20000000L};
            nanosleep(&ts, NULL);
        }
        if (n > 0 && stdin_open && (fds[1].revents & (POLLIN | POLLHUP))) {
            ssize_t got = read(STDIN_FILENO, line + line_len, sizeof line - 1 - line_len);
            if (got <= 0) {
                stdin_open = false;
                running = false; /* whoever started us is gone */
            } else {
                char *nl;
                line_len += (size_t)got;
                line[line_len] = '\0';
                while ((nl = strchr(line, '\n')) != NULL) {
                    size_t used = (size_t)(nl - line) + 1u;
                    *nl = '\0';
                    if (!command(&app, &board, line)) {
                        running = false;
                        break;
                    }
                    memmove(line, line + used, line_len - used + 1u);
                    line_len -= used;
                }
                if (line_len >= sizeof line - 1) {
                    line_len = 0; /* an over-long line: drop it */
                }
            }
        }
        mcu_app_poll(&app);
    }
    print_stats(&app, &board);
    if (link != NULL) {
        (void)unlink(link);
    }
    if (slave >= 0) {
        close(slave);
    }
    close(fd);
    return 0;
}
