"""Hailo-8 class PCIe accelerator (hailo_pci driver): D3hot when the last handle closes.

The Hailo driver puts the device in D3hot when *every* process has closed its device file and
brings it to D0 on open (docs/accelerators.md). So:

- `active`/`idle`: present and bound (rescan/bind if needed), then the daemon opens the device
  node and keeps it open: D0, read back from `power/runtime_status` = active;
- `sleep`: the daemon closes its handle; the device suspends only when the applications have
  closed theirs too (they hold a lease instead of an open file). Read-back must show
  `suspended` within `settle_timeout_ms`, else a DriverError names the processes that still
  hold the node (from /proc), so the operator sees who keeps it awake;
- `off`: only with a rail (GPIO enable line): unbind, remove from the bus, cut the rail.

Read-back: device absent -> off; suspended -> sleep; resuming/suspending -> waking/suspending;
active -> `active` while the daemon holds its handle, else `idle` (awake for someone else).
Recovery rungs: rebind, pci_rescan, and rail_cycle when a rail is configured.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..accel import AccelState
from .accel_gpio import GpioAccelerator, GpioOptions, RequestOpener, open_gpiod_request
from .base import DriverError
from .pci_sysfs import PciDevice, holders, wait_for

_STATUS = {"suspended": AccelState.SLEEP, "suspending": AccelState.SUSPENDING, "resuming": AccelState.WAKING}


class PciBackendOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(..., pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$",
                         description="PCI address (e.g. 0000:01:00.0).")
    root: Path = Field(Path("/sys/bus/pci/devices"), description="PCI devices directory.")
    drivers_root: Path = Field(Path("/sys/bus/pci/drivers"), description="PCI drivers directory.")
    rescan_path: Path | None = Field(None, description="Bus rescan file; default <root>/../rescan.")
    rail: GpioOptions | None = Field(None, description="Enable line of the module's rail (for off and rail_cycle).")
    rail_off_ms: int = Field(500, gt=0, description="How long the rail stays off in a rail cycle.")
    poll_interval_ms: int = Field(10, gt=0, description="Read-back polling period.")
    driver_name: str = Field(..., description="Kernel driver to bind.")
    settle_timeout_ms: int = Field(3000, gt=0, description="How long a rescan, bind or power state may take.")

    def pci(self) -> PciDevice:
        return PciDevice(self.address, self.root, self.drivers_root, self.rescan_path)


class HailoOptions(PciBackendOptions):
    driver_name: str = Field("hailo", description="Kernel driver to bind (hailo_pci registers as `hailo`).")
    device_node: Path = Field(Path("/dev/hailo0"), description="Device file the daemon opens to hold D0.")
    settle_timeout_ms: int = Field(3000, gt=0, description="How long D0/D3hot may take to read back.")


class PciBackend:
    """What Hailo and Coral share: the PCI device, an optional rail, the recovery rungs."""

    def __init__(self, options: PciBackendOptions, rail_opener: RequestOpener) -> None:
        self.pci = options.pci()
        self._base = options
        self.rail = GpioAccelerator(options.rail, opener=rail_opener) if options.rail is not None else None
        self._lock = asyncio.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("rebinds", "rescans", "rail_cycles", "settle_timeouts"), 0)

    def recovery_actions(self) -> frozenset[str]:
        return frozenset({"rebind", "pci_rescan", *(("rail_cycle",) if self.rail is not None else ())})

    async def async_open(self) -> None:
        if self.rail is not None:
            await self.rail.async_open()
        if not await asyncio.to_thread(self.pci.present) and self.rail is None:
            raise DriverError(f"PCI device {self.pci.path} not found (and no rail to power it)")

    async def _close_rail(self) -> None:
        if self.rail is not None:
            await self.rail.async_close()

    async def _release(self) -> None:
        """Let go of the device before a recovery step (closing handles etc.)."""

    async def async_recover(self, action: str) -> None:
        async with self._lock:
            await self._release()
            poll = self._base.poll_interval_ms / 1000
            if action == "rebind":
                driver = await asyncio.to_thread(self.pci.bound_driver) or self._driver_name()
                await asyncio.to_thread(self.pci.unbind)
                await wait_for(lambda: self.pci.bound_driver() is None, self._settle_s(), poll,
                               f"{self.pci.address} unbound")
                await asyncio.to_thread(self.pci.bind, driver)
                await wait_for(lambda: self.pci.bound_driver() is not None, self._settle_s(), poll,
                               f"{self.pci.address} bound to {driver}")
                self.counters["rebinds"] += 1
            elif action == "pci_rescan":
                await asyncio.to_thread(self.pci.remove)
                await wait_for(lambda: not self.pci.present(), 5.0, poll, f"{self.pci.address} removed")
                await self._rescan()
            elif action == "rail_cycle" and self.rail is not None:
                await self._remove()
                await self.rail.async_set_state(AccelState.OFF)
                # The rail must stay down long enough to discharge: that is the point here.
                await asyncio.sleep(self._base.rail_off_ms / 1000)
                await self.rail.async_set_state(AccelState.ACTIVE)
                await self._rescan()
                self.counters["rail_cycles"] += 1
            else:
                raise DriverError(f"{type(self).__name__}: cannot {action}")

    async def _rescan(self) -> None:
        await asyncio.to_thread(self.pci.rescan_bus)
        self.counters["rescans"] += 1
        await wait_for(self.pci.present, self._settle_s(), self._base.poll_interval_ms / 1000,
                       f"{self.pci.address} present after rescan")

    async def _ensure_present_and_bound(self) -> None:
        if self.rail is not None and await self.rail.async_read_state() is AccelState.OFF:
            await self.rail.async_set_state(AccelState.ACTIVE)
        if not await asyncio.to_thread(self.pci.present):
            await self._rescan()
        if await asyncio.to_thread(self.pci.bound_driver) is None:
            await asyncio.to_thread(self.pci.bind, self._driver_name())
            await wait_for(lambda: self.pci.bound_driver() is not None, self._settle_s(),
                           self._base.poll_interval_ms / 1000, f"{self.pci.address} bound")

    async def _power_off(self) -> None:
        if self.rail is None:
            raise DriverError("state 'off' needs a rail (options.rail): without one the deepest state is sleep")
        await self._remove()
        await self.rail.async_set_state(AccelState.OFF)

    async def _remove(self) -> None:
        """Unbind and remove, and wait until the device has left the bus: power is cut only
        under a device the kernel no longer drives."""
        await asyncio.to_thread(self.pci.unbind)
        await asyncio.to_thread(self.pci.remove)
        await wait_for(lambda: not self.pci.present(), self._settle_s(), self._base.poll_interval_ms / 1000,
                       f"{self.pci.address} removed")

    def _driver_name(self) -> str:
        return self._base.driver_name

    def _settle_s(self) -> float:
        return self._base.settle_timeout_ms / 1000


class HailoAccelerator(PciBackend):
    kind: ClassVar[str] = "hailo_pcie"

    def __init__(self, options: HailoOptions | Mapping[str, Any], *,
                 rail_opener: RequestOpener = open_gpiod_request) -> None:
        self.options = options if isinstance(options, HailoOptions) else HailoOptions.model_validate(options)
        super().__init__(self.options, rail_opener)
        self._fd: int | None = None
        self._running = AccelState.ACTIVE

    async def async_close(self) -> None:
        await self._release()
        await self._close_rail()

    async def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            await asyncio.to_thread(os.close, fd)

    async def async_set_state(self, target: AccelState) -> None:
        poll = self.options.poll_interval_ms / 1000
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
                await self._settle(lambda: self.pci.runtime_status() == "active", "D0 (runtime_status active)", poll)
            elif target is AccelState.SLEEP:
                await self._release()
                if await asyncio.to_thread(self.pci.present):
                    try:
                        await self._settle(lambda: self.pci.runtime_status() == "suspended",
                                           "D3hot (runtime_status suspended)", poll)
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

    async def _settle(self, check: Any, what: str, poll: float) -> None:
        try:
            await wait_for(check, self._settle_s(), poll, f"{self.pci.address} {what}")
        except DriverError:
            self.counters["settle_timeouts"] += 1
            raise

    async def async_read_state(self) -> AccelState:
        if not await asyncio.to_thread(self.pci.present):
            return AccelState.OFF
        status = await asyncio.to_thread(self.pci.runtime_status)
        if status == "active":
            return self._running if self._fd is not None else AccelState.IDLE
        return _STATUS.get(status or "", AccelState.UNKNOWN)


__all__ = ["HailoAccelerator", "HailoOptions", "PciBackend", "PciBackendOptions"]
