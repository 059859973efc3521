"""Runs the virtual vehicle on a real python-can bus: each DBC message goes out at its cycle
time in plant time, with a floor on the wall-clock spacing so that a high speed-up does not
flood the bus (at speed-up S a message goes out at least every `min_wall_period_s`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import can

from .vehicle import VirtualVehicle

log = logging.getLogger(__name__)


async def async_drive(
    vehicle: VirtualVehicle,
    bus: can.BusABC,
    now: Callable[[], float],
    stop: asyncio.Event,
    *,
    start: float,
    min_wall_period_s: float = 0.005,
    until: float | None = None,
) -> int:
    """Send frames until `stop` is set or plant time passes `until`; returns frames sent.
    `now()` is plant time; plant t=0 corresponds to `start`."""
    sent = 0
    previous = -1e-9
    while not stop.is_set():
        t = now() - start
        if until is not None and t > until:
            break
        # At a high speed-up several periods of one message fall in one wall step: send only
        # the newest of each, which is what a receiver would keep anyway.
        latest = {(m.arbitration_id, m.is_extended_id): m for m in vehicle.frames_due(previous, t)}
        for msg in latest.values():
            try:
                bus.send(msg)
                sent += 1
            except can.CanError as exc:
                log.warning("plant: send failed: %s", exc)
        previous = t
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min_wall_period_s)
    return sent
