/* SPDX-License-Identifier: Apache-2.0
 *
 * Single-producer single-consumer byte ring: the UART receive interrupt pushes, the main loop
 * pops. No locks: each index is written by one side only. The indices are free-running
 * `mcu_ring_index_t` counters (default uint32_t: one load/store on a 32-bit MCU; an 8/16-bit
 * port should define it as a type its CPU reads atomically, e.g. uint8_t with size <= 128).
 * On a multi-core part where producer and consumer run on different cores (RP2040 with the
 * UART interrupt on core 1), define MCU_RING_BARRIER() as a data memory barrier (__DMB()).
 */
#ifndef MCU_RING_H
#define MCU_RING_H

#include <stdbool.h>
#include <stdint.h>

#ifndef MCU_RING_SIZE
#define MCU_RING_SIZE 256u /* power of two; >= one maximal frame plus the main loop's latency */
#endif
#if (MCU_RING_SIZE & (MCU_RING_SIZE - 1u)) != 0 || MCU_RING_SIZE < 2u
#error "MCU_RING_SIZE must be a power of two"
#endif

#ifndef MCU_RING_BARRIER
#define MCU_RING_BARRIER() ((void)0)
#endif

#ifndef MCU_RING_INDEX_T
#define MCU_RING_INDEX_T uint32_t
#endif
typedef MCU_RING_INDEX_T mcu_ring_index_t;

typedef struct {
    volatile uint8_t data[MCU_RING_SIZE];
    volatile mcu_ring_index_t head;     /* written by the producer */
    volatile mcu_ring_index_t tail;     /* written by the consumer */
    volatile uint32_t overruns;         /* bytes lost because the ring was full (producer) */
} mcu_ring_t;

void mcu_ring_init(mcu_ring_t *r);
/* Producer (interrupt) side: false (and an overrun counted) when full. */
bool mcu_ring_push(mcu_ring_t *r, uint8_t byte);
/* Consumer side: false when empty. */
bool mcu_ring_pop(mcu_ring_t *r, uint8_t *byte);
mcu_ring_index_t mcu_ring_count(const mcu_ring_t *r);

#endif /* MCU_RING_H */
