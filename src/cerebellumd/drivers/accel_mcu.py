"""Accelerator rail and rail power through the companion MCU (McuLink).

`McuAccelerator`: `active`/`idle` = RAIL_COMMAND ON, `off`/`sleep` = RAIL_COMMAND OFF (the MCU
switches a plain rail: no sleep distinct from off). Each command waits for the MCU's ACK and
then for a READINGS frame, received after the ACK, that shows the new rail state. The state
is read back from the latest READINGS (`rail_on`) as long as it is fresher than
`readings_max_age_ms`; older or absent readings read as unknown. As with GPIO, the powered
and unpowered classes are labelled with the last commanded state of that class.

`McuPowerSensor`: the rail power (`rail_mw`) from the latest fresh READINGS, measured=True.

Both take the McuLink to use; the daemon should share one link per serial port between them
(and its own listeners for wake/sleep requests). When none is given, the accelerator creates
and owns one from `options.link`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..accel import AccelState
from .base import DriverError, PowerReading, options_of
from .mcu_link import McuLink, McuLinkOptions
from .mcu_protocol import Message, Readings
from .preflight_checks import Problem, character_device


class McuAcceleratorOptions(BaseModel):
    """Rail control through the companion MCU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    link: McuLinkOptions | None = Field(
        None, description="Serial link settings (when the driver owns its link).")
    ack_timeout_ms: int = Field(500, gt=0, description="Wait for the MCU's ACK of a command.")
    confirm_timeout_ms: int = Field(
        2000, gt=0, description="Wait for READINGS showing the commanded rail state.")
    readings_max_age_ms: int = Field(
        1000, gt=0, description="Older READINGS do not count for the read-back.")


class McuPowerSensorOptions(BaseModel):
    """Rail power measured by the companion MCU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    link: McuLinkOptions | None = Field(
        None, description="Serial link settings (when the sensor owns its link).")
    readings_max_age_ms: int = Field(
        1000, gt=0, description="Older READINGS give no reading (None).")


def _fresh_readings(link: McuLink, max_age_ms: int) -> Readings | None:
    if link.last_readings is None or link.last_readings_time is None:
        return None
    if time.monotonic() - link.last_readings_time > max_age_ms / 1000:
        return None
    return link.last_readings


def _own_link(options: McuLinkOptions | None, who: str) -> McuLink:
    if options is None:
        raise ValueError(f"{who}: give `link` options or an McuLink")
    return McuLink(options)


class McuAccelerator:
    """AcceleratorDriver switching the accelerator rail through the companion MCU."""

    kind: ClassVar[str] = "mcu"

    @staticmethod
    def preflight(options: McuAcceleratorOptions | Mapping[str, Any]) -> list[Problem]:
        """`check --here`: the serial port of a link the driver owns."""
        opts = options_of(McuAcceleratorOptions, options)
        problem = character_device(opts.link.port, "MCU serial port") if opts.link is not None else None
        return [problem] if problem else []

    def __init__(
        self, options: McuAcceleratorOptions | Mapping[str, Any], link: McuLink | None = None
    ) -> None:
        self.options = options_of(McuAcceleratorOptions, options)
        self._owns_link = link is None
        self.link = link if link is not None else _own_link(self.options.link, "McuAccelerator")
        self._powered_label = AccelState.ACTIVE
        self._unpowered_label = AccelState.OFF
        self._lock = asyncio.Lock()
        self._rail_seen: asyncio.Event = asyncio.Event()
        self._want_rail: bool | None = None
        self._remove_listener = self.link.add_listener(self._on_message)
        self.counters: dict[str, int] = dict.fromkeys(("commands", "confirm_timeouts"), 0)

    async def async_open(self) -> None:
        if self._owns_link:
            await self.link.async_start()

    async def async_close(self) -> None:
        self._remove_listener()
        self._remove_listener = lambda: None
        if self._owns_link:
            await self.link.async_close()

    def _on_message(self, message: Message) -> None:
        body = message.body
        if isinstance(body, Readings) and body.rail_on == self._want_rail:
            self._rail_seen.set()

    async def async_set_state(self, target: AccelState) -> None:
        if target in (AccelState.ACTIVE, AccelState.IDLE):
            on = True
        elif target in (AccelState.OFF, AccelState.SLEEP):
            on = False
        else:
            raise DriverError(f"cannot command transitional state {target.value!r}")
        async with self._lock:
            # Always send: the MCU answers an unchanged state with a plain ACK, and the
            # command is the only way to learn that it is still listening.
            self._want_rail = on
            self._rail_seen.clear()
            self.counters["commands"] += 1
            await self.link.async_send_rail_command(on, self.options.ack_timeout_ms / 1000)
            try:
                async with asyncio.timeout(self.options.confirm_timeout_ms / 1000):
                    await self._rail_seen.wait()
            except TimeoutError:
                self.counters["confirm_timeouts"] += 1
                raise DriverError(
                    f"MCU acknowledged rail {'on' if on else 'off'} but no READINGS showed it "
                    f"within {self.options.confirm_timeout_ms} ms") from None
            finally:
                self._want_rail = None
            if on:
                self._powered_label = target
            else:
                self._unpowered_label = target

    async def async_read_state(self) -> AccelState:
        readings = _fresh_readings(self.link, self.options.readings_max_age_ms)
        if readings is None:
            return AccelState.UNKNOWN
        return self._powered_label if readings.rail_on else self._unpowered_label


class McuPowerSensor:
    """PowerSensor: accelerator rail power from the MCU's READINGS."""

    kind: ClassVar[str] = "mcu"

    def __init__(
        self, options: McuPowerSensorOptions | Mapping[str, Any], link: McuLink | None = None
    ) -> None:
        self.options = options_of(McuPowerSensorOptions, options)
        self._owns_link = link is None
        self.link = link if link is not None else _own_link(self.options.link, "McuPowerSensor")
        self.counters: dict[str, int] = dict.fromkeys(("reads", "stale"), 0)

    async def async_open(self) -> None:
        if self._owns_link:
            await self.link.async_start()

    async def async_close(self) -> None:
        if self._owns_link:
            await self.link.async_close()

    async def async_read(self) -> PowerReading | None:
        readings = _fresh_readings(self.link, self.options.readings_max_age_ms)
        if readings is None:
            self.counters["stale"] += 1
            return None
        self.counters["reads"] += 1
        return PowerReading(watts=readings.rail_mw / 1000, measured=True)
