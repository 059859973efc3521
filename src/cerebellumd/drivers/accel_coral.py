"""Coral Edge TPU class PCIe accelerator (apex driver): no runtime PM.

The apex driver saves power only on the final close and resets the chip on every open (resets
of 12 s have been seen), and ASPM disabled on the card costs ~3 W at platform level
(docs/accelerators.md). Real savings need the driver gone or the rail cut:

- `sleep`: unbind the device from the apex driver (nothing can open it; it idles unclocked);
  with a rail configured, `sleep` cuts the rail like `off` (an unbound but powered Coral still
  draws the ASPM penalty);
- `off`: unbind, remove from the bus, cut the rail (needs `rail`);
- `active`/`idle`: rail on, rescan until the device is back, bind to apex, wait for the bind.
  Timeouts are long by default (`settle_timeout_ms` 15 s) so a slow reset is not an error.

Read-back: device absent -> off; present but unbound -> sleep; bound -> the last commanded of
active/idle (PCI cannot tell them apart). Recovery rungs: rebind, pci_rescan, rail_cycle (rail).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from ..accel import AccelState
from .accel_gpio import RequestOpener, open_gpiod_request
from .accel_hailo import PciBackend, PciBackendOptions
from .base import DriverError
from .pci_sysfs import wait_for


class CoralOptions(PciBackendOptions):
    driver_name: str = Field("apex", description="Kernel driver to bind.")
    settle_timeout_ms: int = Field(
        15000, gt=0, description="How long rescan/bind may take (the chip resets on open: ~12 s seen).")


class CoralAccelerator(PciBackend):
    kind: ClassVar[str] = "coral_pcie"

    def __init__(self, options: CoralOptions | Mapping[str, Any], *,
                 rail_opener: RequestOpener = open_gpiod_request) -> None:
        self.options = options if isinstance(options, CoralOptions) else CoralOptions.model_validate(options)
        super().__init__(self.options, rail_opener)
        self._running = AccelState.ACTIVE
        self._down = AccelState.OFF  # label of "rail cut": sleep when sleep was commanded as a cut

    async def async_close(self) -> None:
        await self._close_rail()

    async def async_set_state(self, target: AccelState) -> None:
        async with self._lock:
            if target in (AccelState.ACTIVE, AccelState.IDLE):
                await self._ensure_present_and_bound()
                self._running = target
            elif target is AccelState.OFF or (target is AccelState.SLEEP and self.rail is not None):
                await self._power_off()
                self._down = target
            elif target is AccelState.SLEEP:
                await asyncio.to_thread(self.pci.unbind)
                await wait_for(lambda: self.pci.bound_driver() is None, self._settle_s(),
                               self.options.poll_interval_ms / 1000, f"{self.pci.address} unbound")
            else:
                raise DriverError(f"cannot command transitional state {target.value!r}")

    async def async_read_state(self) -> AccelState:
        if not await asyncio.to_thread(self.pci.present):
            return self._down
        if await asyncio.to_thread(self.pci.bound_driver) is None:
            return AccelState.SLEEP
        return self._running
