/* SPDX-License-Identifier: Apache-2.0 */
#include "mcu_ring.h"

#define MASK ((mcu_ring_index_t)(MCU_RING_SIZE - 1u))

void mcu_ring_init(mcu_ring_t *r)
{
    r->head = 0;
    r->tail = 0;
    r->overruns = 0;
}

mcu_ring_index_t mcu_ring_count(const mcu_ring_t *r)
{
    return (mcu_ring_index_t)(r->head - r->tail);
}

bool mcu_ring_push(mcu_ring_t *r, uint8_t byte)
{
    mcu_ring_index_t head = r->head;
    if ((mcu_ring_index_t)(head - r->tail) >= (mcu_ring_index_t)MCU_RING_SIZE) {
        r->overruns++;
        return false;
    }
    r->data[head & MASK] = byte;
    MCU_RING_BARRIER(); /* the byte is visible before the index that publishes it */
    r->head = (mcu_ring_index_t)(head + 1u);
    return true;
}

bool mcu_ring_pop(mcu_ring_t *r, uint8_t *byte)
{
    mcu_ring_index_t tail = r->tail;
    if (r->head == tail) {
        return false;
    }
    MCU_RING_BARRIER();
    *byte = r->data[tail & MASK];
    MCU_RING_BARRIER(); /* read the byte before giving its slot back */
    r->tail = (mcu_ring_index_t)(tail + 1u);
    return true;
}
