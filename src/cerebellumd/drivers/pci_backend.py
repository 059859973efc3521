"""What the vendor PCIe backends (Hailo, Coral) share: the PCI function and its steps
(`pci_sysfs.PciSteps`), `power/control` as found (`pci_sysfs.ControlKeeper`), an optional rail
(a GPIO enable line) and the wake watchdog's recovery rungs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pydantic import Field

from ..accel import AccelState
from .accel_gpio import GpioAccelerator, GpioOptions, RequestOpener
from .base import DriverError
from .pci_sysfs import ControlKeeper, PciOptions, PciSteps
from .preflight_checks import Problem


class PciBackendOptions(PciOptions):
    rail: GpioOptions | None = Field(None, description="Enable line of the module's rail (for off and rail_cycle).")
    rail_off_ms: int = Field(500, gt=0, description="How long the rail stays off in a rail cycle.")
    driver_name: str = Field(..., description="Kernel driver to bind.")


def pci_backend_problems(options: PciBackendOptions) -> list[Problem]:
    """`check --here` for a PCI backend: the function enumerated, the rail's GPIO chip usable."""
    found = [options.presence_problem()]
    if options.rail is not None:
        found += GpioAccelerator.preflight(options.rail)
    return [p for p in found if p is not None]


class PciBackend:
    """The PCI device, an optional rail, the recovery rungs (rebind, pci_rescan, rail_cycle)."""

    def __init__(self, options: PciBackendOptions, rail_opener: RequestOpener) -> None:
        self._base = options
        self.counters: dict[str, int] = dict.fromkeys(
            ("rebinds", "removes", "rescans", "rail_cycles", "settle_timeouts", "control_writes"), 0)
        self.steps = PciSteps(options, self.counters)
        self.pci = self.steps.pci
        self.control = ControlKeeper(self.pci)
        self.rail = GpioAccelerator(options.rail, opener=rail_opener) if options.rail is not None else None
        self._lock = asyncio.Lock()

    def recovery_actions(self) -> frozenset[str]:
        return frozenset({"rebind", "pci_rescan", *(("rail_cycle",) if self.rail is not None else ())})

    async def async_open(self) -> None:
        if self.rail is not None:
            await self.rail.async_open()
        if await self.steps.present():
            await self.control.remember()
        elif self.rail is None:
            raise DriverError(f"PCI device {self.pci.path} not found (and no rail to power it)")

    async def _stop(self) -> None:
        """At stop: power/control back to what it was found (device present), rail released."""
        try:
            await self.control.restore()
            self.counters["control_writes"] = self.control.writes
        finally:
            if self.rail is not None:
                await self.rail.async_close()

    async def _allow_runtime_pm(self) -> None:
        """power/control = auto: PCI devices start with runtime PM forbidden and user space
        allows it (Documentation/power/pci.rst, section 3.2)."""
        await self.control.set("auto")
        self.counters["control_writes"] = self.control.writes

    async def _release(self) -> None:
        """Let go of the device before a recovery step (closing handles etc.)."""

    async def async_recover(self, action: str) -> None:
        async with self._lock:
            await self._release()
            if action == "rebind":
                await self.steps.rebind(self._base.driver_name)
            elif action == "pci_rescan":
                await self.steps.remove()
                await self.steps.rescan()
            elif action == "rail_cycle" and self.rail is not None:
                await self.steps.remove(unbind_first=True)
                await self.rail.async_set_state(AccelState.OFF)
                # The rail must stay down long enough to discharge: that is the point here.
                await asyncio.sleep(self._base.rail_off_ms / 1000)
                await self.rail.async_set_state(AccelState.ACTIVE)
                await self.steps.rescan()
                self.counters["rail_cycles"] += 1
            else:
                raise DriverError(f"{type(self).__name__}: cannot {action}")

    async def _ensure_present_and_bound(self) -> None:
        if self.rail is not None and await self.rail.async_read_state() is AccelState.OFF:
            await self.rail.async_set_state(AccelState.ACTIVE)
        if not await self.steps.present():
            await self.steps.rescan()
        await self.control.remember()
        if await self.steps.bound_driver() is None:
            await self.steps.bind(self._base.driver_name)

    async def _power_off(self) -> None:
        """Unbind and remove, and wait until the device has left the bus: power is cut only
        under a device the kernel no longer drives."""
        if self.rail is None:
            raise DriverError("state 'off' needs a rail (options.rail): without one the deepest state is sleep")
        await self.steps.remove(unbind_first=True)
        await self.rail.async_set_state(AccelState.OFF)

    async def _settle(self, check: Callable[[], bool], what: str) -> None:
        try:
            await self.steps.wait(check, what)
        except DriverError:
            self.counters["settle_timeouts"] += 1
            raise
