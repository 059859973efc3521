/* SPDX-License-Identifier: Apache-2.0
 *
 * What the MCU application needs from the board. A port fills one `mcu_hal_t` with its own
 * functions (UART driver, SysTick/timer, ADC + shunt amplifier, load switch, GPIO) and a
 * context pointer; the application never touches hardware itself. main_host.c is a POSIX port
 * with simulated rails; README.md sketches S32K, RP2040 and STM32 ports.
 */
#ifndef MCU_HAL_H
#define MCU_HAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Measurements, in the protocol's units. */
typedef enum {
    MCU_SENSE_BATTERY_MV = 0, /* supply (battery) voltage, mV */
    MCU_SENSE_MCU_TEMP_DC,    /* MCU die temperature, 0.1 degC */
    MCU_SENSE_ACCEL_TEMP_DC,  /* accelerator temperature (NTC), 0.1 degC */
    MCU_SENSE_RAIL_MV,        /* accelerator rail voltage, mV */
    MCU_SENSE_RAIL_MA,        /* accelerator rail current, mA */
    MCU_SENSE_COUNT
} mcu_sense_t;

typedef struct mcu_hal {
    void *ctx; /* passed to every function */

    /* Queue bytes for the UART transmitter; returns how many were taken (fewer = dropped, the
     * application counts it). May block for at most one frame time. */
    size_t (*uart_write)(void *ctx, const uint8_t *data, size_t len);

    /* Milliseconds from a free-running counter; wraps at 2^32 (the application compares
     * times modulo 2^32). */
    uint32_t (*millis)(void *ctx);

    /* One measurement; false when it could not be taken (no READINGS frame is sent then). */
    bool (*sense)(void *ctx, mcu_sense_t what, int32_t *value);

    /* Switch the accelerator rail (load switch enable). Returns true when the rail reached the
     * state (power-good pin, or the rail voltage), false on a fault. */
    bool (*rail_set)(void *ctx, bool on);

    /* Level of the wake line (true = asserted): e.g. a CAN transceiver's wake/INH output, a
     * diagnostics tester present line or a button. May be NULL (no wake line). */
    bool (*wake_line)(void *ctx);

    /* Ignition (KL15) input, for the HEARTBEAT status. May be NULL (reported off). */
    bool (*ignition)(void *ctx);

    /* Switch the gateway's own supply (the enable of its regulator or a load switch): off after
     * POWER_DOWN_ALLOWED's delay, on again at ignition or at the NEXT_WAKE time. May be NULL:
     * the MCU cannot cut the gateway, and the commands are only ACKed and reported as events. */
    void (*gateway_power)(void *ctx, bool on);
} mcu_hal_t;

#endif /* MCU_HAL_H */
