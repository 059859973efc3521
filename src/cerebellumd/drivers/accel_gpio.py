"""Accelerator power through GPIO lines (libgpiod v2): an enable line switching the module's
rail or its power-enable pin, an optional reset line (pulsed) and an optional power-good input.

A plain rail has only two physical states: powered (`active`/`idle`, which the hardware cannot
tell apart) and unpowered (`off`; `sleep` is the same as `off` here, there is no retention
state on a bare rail). `async_read_state` reads the power class from the power-good line (or
from the enable line when there is none) and labels it with the last commanded state of that
class, so a commanded `idle` reads back `idle` while the rail is up, and `off` or `sleep`
reads back as commanded while it is down. The power itself is always read from hardware.

Recovery (`RecoverableAccelerator`): `rail_cycle` only (nothing to rebind on a bare rail):
enable off, power-good low (when wired), `rail_off_ms` down so the module discharges, enable
on, the reset pulse when `reset_after_power_on`, power-good high. It returns once the rail is
back; the wake watchdog reads the state back as usual.

The gpiod calls sit behind a small seam (`LineRequestLike` and `RequestOpener`) so that tests
can inject a fake request object; everything else is the real code path. gpiod calls are
ioctls on the chip fd: they run in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

from gpiod.line import Direction, Value
from pydantic import BaseModel, ConfigDict, Field

from ..accel import AccelState
from ._poll import PollTimeout, poll_until
from .base import DriverError, options_of
from .preflight_checks import Problem, character_device

LineId = int | str


class GpioOptions(BaseModel):
    """GPIO lines of the accelerator's power control."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chip: str = Field("/dev/gpiochip0", description="GPIO chip device path.")
    enable_line: LineId = Field(..., description="Enable/power line: offset or line name.")
    enable_active_low: bool = Field(False, description="Enable line is active low.")
    reset_line: LineId | None = Field(None, description="Optional reset line (offset or name).")
    reset_active_low: bool = Field(True, description="Reset line is active low (usual RESET#).")
    reset_pulse_ms: int = Field(10, gt=0, description="Reset pulse width.")
    reset_after_power_on: bool = Field(
        False, description="Pulse reset after switching the rail on.")
    power_good_line: LineId | None = Field(
        None, description="Optional power-good input line; read-back uses it when given.")
    power_good_active_low: bool = Field(False, description="Power-good line is active low.")
    power_good_timeout_ms: int = Field(
        500, gt=0, description="How long power-good may take to follow the enable line.")
    poll_interval_ms: int = Field(5, gt=0, description="Power-good polling period.")
    rail_off_ms: int = Field(
        500, gt=0, description="How long the rail stays off in a rail cycle (watchdog recovery).")
    initial_enable: bool | None = Field(
        None, description="Drive the enable line to this at open; None keeps its current level.")
    consumer: str = Field("cerebellumd", description="Consumer name shown by gpioinfo.")


class LineRequestLike(Protocol):
    """The part of gpiod.LineRequest this driver uses (tests implement it)."""

    def get_value(self, line: LineId) -> Value: ...

    def set_value(self, line: LineId, value: Value) -> None: ...

    def release(self) -> None: ...


RequestOpener = Callable[[GpioOptions], LineRequestLike]


def open_gpiod_request(options: GpioOptions) -> LineRequestLike:
    """Request the lines from the kernel with gpiod v2 (runs in a worker thread).

    The enable line is first requested as-is and read, then reconfigured as an output driving
    the level it already had (or `initial_enable`): starting the daemon must not power-cycle
    the accelerator."""
    import gpiod
    from gpiod import LineSettings

    def out_settings(active_low: bool, value: Value) -> LineSettings:
        return LineSettings(direction=Direction.OUTPUT, active_low=active_low, output_value=value)

    config: dict[Iterable[LineId] | LineId, LineSettings | None] = {
        options.enable_line: LineSettings(direction=Direction.AS_IS,
                                          active_low=options.enable_active_low),
    }
    if options.reset_line is not None:
        config[options.reset_line] = out_settings(options.reset_active_low, Value.INACTIVE)
    if options.power_good_line is not None:
        config[options.power_good_line] = LineSettings(
            direction=Direction.INPUT, active_low=options.power_good_active_low)
    request = gpiod.request_lines(options.chip, config=config, consumer=options.consumer)
    try:
        if options.initial_enable is None:
            level = request.get_value(options.enable_line)
        else:
            level = Value.ACTIVE if options.initial_enable else Value.INACTIVE
        # reconfigure_lines resets lines it is not given: pass every line again.
        config[options.enable_line] = out_settings(options.enable_active_low, level)
        request.reconfigure_lines(config)
    except BaseException:
        request.release()
        raise
    return request


class GpioAccelerator:
    """AcceleratorDriver over an enable line (+ optional reset and power-good lines)."""

    kind: ClassVar[str] = "gpio"

    @staticmethod
    def preflight(options: GpioOptions | Mapping[str, Any]) -> list[Problem]:
        """`check --here`: the GPIO chip (blocking stat)."""
        opts = options_of(GpioOptions, options)
        problem = character_device(opts.chip, "GPIO chip", "gpiodetect lists the chips")
        return [problem] if problem else []

    def __init__(
        self,
        options: GpioOptions | Mapping[str, Any],
        *,
        opener: RequestOpener = open_gpiod_request,
    ) -> None:
        self.options = options_of(GpioOptions, options)
        self._opener = opener
        self._request: LineRequestLike | None = None
        self._powered_label = AccelState.ACTIVE
        self._unpowered_label = AccelState.OFF
        self._lock = asyncio.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("switch_on", "switch_off", "resets", "power_good_timeouts", "rail_cycles"), 0)

    async def async_open(self) -> None:
        if self._request is not None:
            return
        try:
            self._request = await asyncio.to_thread(self._opener, self.options)
        except (OSError, ValueError) as exc:
            raise DriverError(f"cannot request GPIO lines on {self.options.chip}: {exc}") from exc

    async def async_close(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            # Releasing leaves the line level to the kernel/driver; the daemon sets the safe
            # state before closing.
            await asyncio.to_thread(request.release)

    def _req(self) -> LineRequestLike:
        if self._request is None:
            raise DriverError("GPIO accelerator is not open")
        return self._request

    async def async_set_state(self, target: AccelState) -> None:
        powered = _wants_power(target)
        async with self._lock:
            request = self._req()
            enable = self.options.enable_line
            current = await self._get(request, enable)
            if (current is Value.ACTIVE) != powered:
                await self._set(request, enable, Value.ACTIVE if powered else Value.INACTIVE)
                self.counters["switch_on" if powered else "switch_off"] += 1
                if powered and self.options.reset_after_power_on:
                    await self._pulse_reset(request)
            if powered:
                self._powered_label = target
            else:
                self._unpowered_label = target
            await self._wait_power_good(request, powered)

    def recovery_actions(self) -> frozenset[str]:
        return frozenset({"rail_cycle"})

    async def async_recover(self, action: str) -> None:
        """The watchdog's rail cycle (DriverError for any other action)."""
        if action != "rail_cycle":
            raise DriverError(f"GPIO accelerator cannot {action}: a bare rail only cycles")
        async with self._lock:
            request = self._req()
            enable = self.options.enable_line
            await self._set(request, enable, Value.INACTIVE)
            self.counters["switch_off"] += 1
            await self._wait_power_good(request, False)
            # The rail must stay down long enough to discharge: that is the point here.
            await asyncio.sleep(self.options.rail_off_ms / 1000)
            await self._set(request, enable, Value.ACTIVE)
            self.counters["switch_on"] += 1
            if self.options.reset_after_power_on:
                await self._pulse_reset(request)
            # The watchdog cycles the rail to get a wake through: powered reads back active.
            self._powered_label = AccelState.ACTIVE
            await self._wait_power_good(request, True)
            self.counters["rail_cycles"] += 1

    async def async_reset(self) -> None:
        """Pulse the reset line (DriverError when none is configured)."""
        async with self._lock:
            await self._pulse_reset(self._req())

    async def async_read_state(self) -> AccelState:
        request = self._req()
        line = self.options.power_good_line
        value = await self._get(request, line if line is not None else self.options.enable_line)
        return self._powered_label if value is Value.ACTIVE else self._unpowered_label

    async def _pulse_reset(self, request: LineRequestLike) -> None:
        line = self.options.reset_line
        if line is None:
            raise DriverError("no reset line configured")
        await self._set(request, line, Value.ACTIVE)
        try:
            # The pulse width is the point here, not a wait for something to happen.
            await asyncio.sleep(self.options.reset_pulse_ms / 1000)
        finally:
            await self._set(request, line, Value.INACTIVE)
        self.counters["resets"] += 1

    async def _wait_power_good(self, request: LineRequestLike, powered: bool) -> None:
        line = self.options.power_good_line
        if line is None:
            return
        want = Value.ACTIVE if powered else Value.INACTIVE
        try:
            await poll_until(lambda: self._get(request, line), lambda v: v is want,
                             timeout_s=self.options.power_good_timeout_ms / 1000,
                             interval_s=self.options.poll_interval_ms / 1000, what=f"power-good line {line!r}")
        except PollTimeout as exc:
            self.counters["power_good_timeouts"] += 1
            raise DriverError(
                f"power-good line {line!r} is {exc.last.name} "
                f"{self.options.power_good_timeout_ms} ms after switching the rail "
                f"{'on' if powered else 'off'}") from None

    @staticmethod
    async def _get(request: LineRequestLike, line: LineId) -> Value:
        try:
            return await asyncio.to_thread(request.get_value, line)
        except OSError as exc:
            raise DriverError(f"reading GPIO line {line!r} failed: {exc}") from exc

    @staticmethod
    async def _set(request: LineRequestLike, line: LineId, value: Value) -> None:
        try:
            await asyncio.to_thread(request.set_value, line, value)
        except OSError as exc:
            raise DriverError(f"setting GPIO line {line!r} to {value.name} failed: {exc}") from exc


def _wants_power(target: AccelState) -> bool:
    if target in (AccelState.ACTIVE, AccelState.IDLE):
        return True
    if target in (AccelState.OFF, AccelState.SLEEP):
        return False
    raise DriverError(f"cannot command transitional state {target.value!r}")
