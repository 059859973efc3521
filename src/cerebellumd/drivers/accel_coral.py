"""Coral Edge TPU class PCIe accelerator (apex driver, google/gasket-driver): no runtime PM.

What the vendor driver does (google/gasket-driver, src/apex_driver.c and src/gasket_core.c): it
puts the chip in its own low-power reset state at probe and on the final close of the device
file (`allow_power_save`, default 1: apex_enter_reset()), and resets the chip on every open
(apex_reset(); resets of 12 s have been seen). It calls no runtime-PM helper, so while it is
bound the function stays runtime-active in D0: local_pci_probe() holds a usage count the driver
never drops (Documentation/power/pci.rst, section 3.2). ASPM disabled on the card costs ~3 W at
platform level (docs/accelerators.md). Hence:

- `sleep`: unbind the device from apex (nothing can open it; pci_device_remove() drops the
  probe's usage count) and write `power/control` = "auto" (PCI runtime PM starts forbidden:
  pci.rst section 3.2). The PM core then runtime-suspends the unbound function; the PCI core
  leaves an unbound function in D0 but it may go to D3cold when the bridge above it suspends
  (drivers/pci/pci-driver.c, pci_pm_runtime_suspend(); D3cold also needs `d3cold_allowed` and
  platform support, Documentation/ABI/testing/sysfs-bus-pci). Read back: unbound and
  `power/runtime_status` = "suspended";
- `off`: unbind, remove from the bus, cut the rail (needs `rail`);
- `active`/`idle`: rail on, rescan until the device is back, bind to apex, wait for the bind and
  `power/runtime_status` = "active". Timeouts are long by default (`settle_timeout_ms` 15 s) so a
  slow reset is not an error;
- stop (`async_close`): `power/control` gets back the value found.

Read-back, from sysfs only: device absent -> off; unbound and runtime-suspended (or D3) -> sleep;
unbound and suspending -> suspending; bound and active -> active/idle (PCI cannot tell them
apart: the label is the last commanded of the two); resuming -> waking; anything else (e.g.
unbound but active with runtime PM forbidden) -> unknown. Recovery rungs: rebind, pci_rescan,
rail_cycle (rail).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from ..accel import AccelState
from .accel_gpio import RequestOpener, open_gpiod_request
from .base import DriverError, options_of
from .pci_backend import PciBackend, PciBackendOptions, pci_backend_problems
from .pci_sysfs import D3_STATES
from .preflight_checks import Problem


class CoralOptions(PciBackendOptions):
    driver_name: str = Field("apex", description="Kernel driver to bind.")
    settle_timeout_ms: int = Field(
        15000, gt=0, description="How long rescan/bind may take (the chip resets on open: ~12 s seen).")


class CoralAccelerator(PciBackend):
    kind: ClassVar[str] = "coral_pcie"

    @staticmethod
    def preflight(options: CoralOptions | Mapping[str, Any]) -> list[Problem]:
        """`check --here`: the PCI function and the rail's chip."""
        opts = options_of(CoralOptions, options)
        return pci_backend_problems(opts)

    def __init__(self, options: CoralOptions | Mapping[str, Any], *,
                 rail_opener: RequestOpener = open_gpiod_request) -> None:
        self.options = options_of(CoralOptions, options)
        super().__init__(self.options, rail_opener)
        self._running = AccelState.ACTIVE  # label of a bound, active function: active or idle

    async def async_close(self) -> None:
        async with self._lock:
            await self._stop()

    async def async_set_state(self, target: AccelState) -> None:
        async with self._lock:
            if target in (AccelState.ACTIVE, AccelState.IDLE):
                await self._ensure_present_and_bound()
                await self._settle(lambda: self.pci.runtime_status() == "active", "runtime_status active")
                self._running = target
            elif target is AccelState.SLEEP:
                if not await self.steps.present():
                    raise DriverError(f"PCI device {self.pci.path} not found: sleep needs it on the bus")
                await self.steps.unbind()
                await self._allow_runtime_pm()
                await self._settle(lambda: self.pci.bound_driver() is None and self.pci.low_power(),
                                   "unbound and runtime-suspended")
            elif target is AccelState.OFF:
                await self._power_off()
            else:
                raise DriverError(f"cannot command transitional state {target.value!r}")

    async def async_read_state(self) -> AccelState:
        return await asyncio.to_thread(self._read_state)

    def _read_state(self) -> AccelState:
        if not self.pci.present():
            return AccelState.OFF
        status, power = self.pci.runtime_status(), self.pci.power_state()
        if status == "resuming":
            return AccelState.WAKING
        if self.pci.bound_driver() is None:
            if status == "suspended" or power in D3_STATES:
                return AccelState.SLEEP
            return AccelState.SUSPENDING if status == "suspending" else AccelState.UNKNOWN
        if status == "active":
            return self._running
        if status == "suspended" or power in D3_STATES:
            return AccelState.SLEEP
        return AccelState.UNKNOWN
