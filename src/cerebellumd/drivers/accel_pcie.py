"""Accelerator power through PCIe runtime power management (sysfs).

- `sleep`: write "auto" to `<dev>/power/control`: runtime PM is allowed and the kernel
  suspends the device (D3) once nothing uses it; wait for `power/runtime_status` to read
  "suspended". A driver that keeps the device busy (an open file, as Hailo's does) keeps it
  "active": that is a timeout with the status in the error.
- `active` / `idle`: write "on" (runtime PM forbidden, the device resumes) and wait for
  "active". The kernel cannot tell active from idle: the read-back labels a running device
  with the last commanded of the two.
- `off`: only with `allow_remove`: write 1 to `<dev>/remove` (the device leaves the bus;
  power is then the slot's/driver's business). Any powered state after `off` rescans the bus
  (write 1 to `/sys/bus/pci/rescan`) and waits for the device to come back.

Recovery (`RecoverableAccelerator`, via `pci_sysfs.PciDevice`): `rebind` unbinds the bound
driver and binds it again (or `driver_name` when none is bound); `pci_rescan` removes the device
and rescans the bus (whatever `allow_remove` says: that option is about `off` as a commanded
state, while a rescan is the watchdog's step for a wake that did not come through). Both end
with `power/control` = "on", as a wake wants, and return once the device is back; the watchdog
reads the state back as usual.

`async_read_state`: device directory missing → off; runtime_status active → active/idle,
suspended → sleep, suspending → suspending, resuming → waking, anything else → unknown.
All sysfs I/O runs in a worker thread; waits poll with a deadline.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..accel import AccelState
from .base import DriverError
from .pci_sysfs import PciDevice, wait_for

_STATUS_TO_STATE = {
    "suspended": AccelState.SLEEP,
    "suspending": AccelState.SUSPENDING,
    "resuming": AccelState.WAKING,
}


class PcieRuntimePmOptions(BaseModel):
    """PCIe device whose runtime PM the driver controls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(
        ..., pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$",
        description="PCI address, domain:bus:device.function (e.g. 0000:01:00.0).")
    root: Path = Field(Path("/sys/bus/pci/devices"), description="PCI devices directory.")
    rescan_path: Path | None = Field(
        None, description="Bus rescan file; default: <root>/../rescan.")
    allow_remove: bool = Field(
        False, description="Allow `off` by removing the device from the bus (rescan to return).")
    settle_timeout_ms: int = Field(
        3000, gt=0, description="How long runtime_status may take to reach the target.")
    poll_interval_ms: int = Field(10, gt=0, description="Status polling period.")
    drivers_root: Path = Field(Path("/sys/bus/pci/drivers"), description="PCI drivers directory (rebind).")
    driver_name: str | None = Field(
        None, description="Driver to bind in a rebind when none is bound (default: the bound one).")


class PcieRuntimePmAccelerator:
    """AcceleratorDriver over /sys/bus/pci/devices/<address>/power/{control,runtime_status}."""

    kind: ClassVar[str] = "pcie_runtime_pm"

    def __init__(self, options: PcieRuntimePmOptions | Mapping[str, Any]) -> None:
        self.options = (
            options if isinstance(options, PcieRuntimePmOptions)
            else PcieRuntimePmOptions.model_validate(options)
        )
        self.device = self.options.root / self.options.address
        self.rescan_path = self.options.rescan_path or self.options.root.parent / "rescan"
        self.pci = PciDevice(self.options.address, self.options.root, self.options.drivers_root, self.rescan_path)
        self._running_label = AccelState.ACTIVE
        self._lock = asyncio.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("control_writes", "removes", "rescans", "settle_timeouts", "rebinds"), 0)

    async def async_open(self) -> None:
        """Check the device (or, with allow_remove, the rescan file) is there."""
        if await asyncio.to_thread(self.device.is_dir):
            if not await asyncio.to_thread((self.device / "power" / "control").exists):
                raise DriverError(f"{self.device} has no power/control (runtime PM unsupported)")
            return
        if not self.options.allow_remove:
            raise DriverError(f"PCI device {self.device} not found")

    async def async_close(self) -> None:
        return None

    async def async_set_state(self, target: AccelState) -> None:
        async with self._lock:
            if target is AccelState.OFF:
                await self._remove()
                return
            if target not in (AccelState.ACTIVE, AccelState.IDLE, AccelState.SLEEP):
                raise DriverError(f"cannot command transitional state {target.value!r}")
            if not await asyncio.to_thread(self.device.is_dir):
                await self._rescan()
            if target is AccelState.SLEEP:
                await self._write_control("auto")
                await self._wait_for(lambda s: s == "suspended", "suspended")
            else:
                await self._write_control("on")
                await self._wait_for(lambda s: s == "active", "active")
                self._running_label = target

    async def async_read_state(self) -> AccelState:
        status = await asyncio.to_thread(self._read_status)
        if status is None:
            return AccelState.OFF
        if status == "active":
            return self._running_label
        return _STATUS_TO_STATE.get(status, AccelState.UNKNOWN)

    # -- recovery (wake watchdog) ---------------------------------------------------------------

    def recovery_actions(self) -> frozenset[str]:
        return frozenset({"rebind", "pci_rescan"})

    async def async_recover(self, action: str) -> None:
        async with self._lock:
            settle = self.options.settle_timeout_ms / 1000
            poll = self.options.poll_interval_ms / 1000
            pci = self.pci
            if action == "rebind":
                driver = await asyncio.to_thread(pci.bound_driver) or self.options.driver_name
                if driver is None:
                    raise DriverError(f"cannot rebind {pci.address}: no driver bound and no driver_name")
                await asyncio.to_thread(pci.unbind)
                await wait_for(lambda: pci.bound_driver() is None, settle, poll, f"{pci.address} unbound")
                await asyncio.to_thread(pci.bind, driver)
                await wait_for(lambda: pci.bound_driver() is not None, settle, poll,
                               f"{pci.address} bound to {driver}")
                self.counters["rebinds"] += 1
            elif action == "pci_rescan":
                if await asyncio.to_thread(pci.present):
                    await asyncio.to_thread(pci.remove)
                    self.counters["removes"] += 1
                    await wait_for(lambda: not pci.present(), settle, poll, f"{pci.address} removed")
                await asyncio.to_thread(pci.rescan_bus)
                self.counters["rescans"] += 1
                await wait_for(lambda: (pci.path / "power" / "control").exists(), settle, poll,
                               f"{pci.address} present after rescan")
            else:
                raise DriverError(f"PCIe runtime PM accelerator cannot {action}")
            # A new device or driver starts with whatever runtime-PM default the kernel gives
            # it; the watchdog recovers a wake, so forbid runtime suspend again.
            await self._write_control("on")
            self._running_label = AccelState.ACTIVE

    # -- steps ---------------------------------------------------------------------------------

    async def _write_control(self, value: str) -> None:
        control = self.device / "power" / "control"
        try:
            current = await asyncio.to_thread(_read, control)
            if current != value:  # idempotent: no write when already set
                await asyncio.to_thread(control.write_text, value)
                self.counters["control_writes"] += 1
        except OSError as exc:
            raise DriverError(f"writing {value!r} to {control} failed: {exc}") from exc

    async def _remove(self) -> None:
        if not self.options.allow_remove:
            raise DriverError(
                "state 'off' needs allow_remove = true (it removes the device from the bus)")
        if not await asyncio.to_thread(self.device.is_dir):
            return
        try:
            await asyncio.to_thread((self.device / "remove").write_text, "1")
        except OSError as exc:
            raise DriverError(f"removing {self.device} failed: {exc}") from exc
        self.counters["removes"] += 1
        await self._wait_for(lambda s: s is None, "removed")

    async def _rescan(self) -> None:
        if not self.options.allow_remove:
            raise DriverError(f"PCI device {self.device} not found")
        try:
            await asyncio.to_thread(self.rescan_path.write_text, "1")
        except OSError as exc:
            raise DriverError(f"PCI rescan via {self.rescan_path} failed: {exc}") from exc
        self.counters["rescans"] += 1
        await self._wait_for(lambda s: s is not None, "present after rescan")

    async def _wait_for(self, done: Callable[[str | None], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.settle_timeout_ms / 1000
        while True:
            status = await asyncio.to_thread(self._read_status)
            if done(status):
                return
            if loop.time() >= deadline:
                self.counters["settle_timeouts"] += 1
                raise DriverError(
                    f"{self.device} not {what} after {self.options.settle_timeout_ms} ms "
                    f"(runtime_status: {status or 'device absent'})")
            await asyncio.sleep(self.options.poll_interval_ms / 1000)

    def _read_status(self) -> str | None:
        """runtime_status, None when the device is absent, "error:..." when unreadable."""
        if not self.device.is_dir():
            return None
        try:
            return _read(self.device / "power" / "runtime_status")
        except OSError as exc:
            return f"error:{exc.strerror}"


_WORD = re.compile(r"\S+")


def _read(path: Path) -> str:
    m = _WORD.search(path.read_text(encoding="ascii", errors="replace"))
    return m.group(0) if m else ""
