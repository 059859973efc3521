"""Hailo-8 class PCIe accelerator (hailo_pci / hailo1x_pci driver): D3hot when the last handle
closes, D0 on open.

What the vendor driver does (hailo-ai/hailort-drivers, linux/pcie/src/fops.c and pcie.c): after
loading the firmware at probe it puts the function in D3hot with pci_set_power_state(); the
open of a device file brings it to D0; the release of the last open file puts it back in D3hot.
The module parameter `no_power_mode` turns this off (linux/pcie/Readme.md, hailo1x_pci.conf).
The driver calls no runtime-PM helper at all, so the PM core's `power/runtime_status` keeps
reading "active" (the usage count taken by local_pci_probe() is never dropped:
Documentation/power/pci.rst, section 3.2): the sleep is read back from the PCI core's
`power_state` ("D3hot"; Documentation/ABI/testing/sysfs-bus-pci), and from
`power/runtime_status` = "suspended" for a driver that does use runtime PM.

- `active`/`idle`: present and bound (rescan/bind if needed), then the daemon opens the device
  node and keeps it open; read back `power_state` = D0 (or, on a kernel without that file,
  `power/runtime_status` = active);
- `sleep`: write `power/control` = "auto" (PCI runtime PM starts forbidden and user space allows
  it: Documentation/power/pci.rst, section 3.2; without it a runtime-PM driver never suspends,
  Documentation/ABI/testing/sysfs-devices-power), then the daemon closes its handle. The device
  sleeps only when the applications have closed theirs too (they hold a lease instead of an
  open file). The read-back (D3hot/D3cold, or runtime-suspended) must come within
  `settle_timeout_ms`, else a DriverError names the processes that still hold the node (from
  /proc), so the operator sees who keeps it awake;
- `off`: only with a rail (GPIO enable line): unbind, remove from the bus, cut the rail;
- stop (`async_close`): close the handle, give `power/control` back the value found.

Read-back: device absent -> off; D3hot/D3cold or runtime-suspended -> sleep; suspending/resuming
-> suspending/waking; D0 -> `active` while the daemon holds its handle, else `idle` (awake for
someone else). Recovery rungs: rebind, pci_rescan, and rail_cycle when a rail is configured.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from ..accel import AccelState
from .accel_gpio import RequestOpener, open_gpiod_request
from .base import DriverError, options_of
from .pci_backend import PciBackend, PciBackendOptions, pci_backend_problems
from .pci_sysfs import D3_STATES, PciDevice, holders
from .preflight_checks import Problem

_STATUS = {"suspending": AccelState.SUSPENDING, "resuming": AccelState.WAKING}


class HailoOptions(PciBackendOptions):
    driver_name: str = Field("hailo", description="Kernel driver to bind (hailo_pci registers as `hailo`).")
    device_node: Path = Field(Path("/dev/hailo0"), description="Device file the daemon opens to hold D0.")
    settle_timeout_ms: int = Field(3000, gt=0, description="How long D0/D3hot may take to read back.")


def _awake(pci: PciDevice) -> bool:
    """D0 by the PCI core's power_state; runtime_status active where the kernel has no such file."""
    state = pci.power_state()
    if state is not None:
        return state == "D0" and pci.runtime_status() not in ("suspended", "suspending", "resuming")
    return pci.runtime_status() == "active"


class HailoAccelerator(PciBackend):
    kind: ClassVar[str] = "hailo_pcie"

    @staticmethod
    def preflight(options: HailoOptions | Mapping[str, Any]) -> list[Problem]:
        """`check --here`: the PCI function, the rail's chip, and the device node hailo_pci makes
        (absent while the driver is not bound: a warning)."""
        opts = options_of(HailoOptions, options)
        found = pci_backend_problems(opts)
        if not opts.device_node.exists():
            found.append(("warning", f"{opts.device_node} does not exist (is hailo_pci loaded and bound?)"))
        return found

    def __init__(self, options: HailoOptions | Mapping[str, Any], *,
                 rail_opener: RequestOpener = open_gpiod_request) -> None:
        self.options = options_of(HailoOptions, options)
        super().__init__(self.options, rail_opener)
        self._fd: int | None = None
        self._running = AccelState.ACTIVE

    async def async_close(self) -> None:
        async with self._lock:
            try:
                await self._release()
            finally:
                await self._stop()

    async def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            await asyncio.to_thread(os.close, fd)

    async def async_set_state(self, target: AccelState) -> None:
        async with self._lock:
            if target in (AccelState.ACTIVE, AccelState.IDLE):
                await self._ensure_present_and_bound()
                if self._fd is None:
                    node = str(self.options.device_node)
                    try:
                        self._fd = await asyncio.to_thread(os.open, node, os.O_RDWR | os.O_CLOEXEC)
                    except OSError as exc:
                        raise DriverError(f"opening {node} failed: {exc}") from exc
                self._running = target
                await self._settle(lambda: _awake(self.pci), "D0 (power_state D0, runtime_status active)")
            elif target is AccelState.SLEEP:
                present = await self.steps.present()
                if present:
                    await self._allow_runtime_pm()
                await self._release()
                if present:
                    try:
                        await self._settle(self.pci.low_power,
                                           "D3 (power_state D3hot/D3cold or runtime_status suspended)")
                    except DriverError as exc:
                        held = await asyncio.to_thread(holders, self.options.device_node)
                        who = ", ".join(f"{comm}[{pid}]" for pid, comm in held) or "no process found"
                        raise DriverError(f"{exc}; {self.options.device_node} still open by: {who} "
                                          "(applications should hold a lease, not the device)") from None
            elif target is AccelState.OFF:
                await self._release()
                await self._power_off()
            else:
                raise DriverError(f"cannot command transitional state {target.value!r}")

    async def async_read_state(self) -> AccelState:
        return await asyncio.to_thread(self._read_state)

    def _read_state(self) -> AccelState:
        if not self.pci.present():
            return AccelState.OFF
        status, power = self.pci.runtime_status(), self.pci.power_state()
        if status == "suspended" or power in D3_STATES:
            return AccelState.SLEEP
        if status in _STATUS:
            return _STATUS[status]
        if status == "active" and power in ("D0", None):
            return self._running if self._fd is not None else AccelState.IDLE
        return AccelState.UNKNOWN


__all__ = ["HailoAccelerator", "HailoOptions", "PciBackend", "PciBackendOptions"]
