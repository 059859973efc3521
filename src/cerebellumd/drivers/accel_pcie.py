"""Accelerator power through PCIe runtime power management (sysfs).

Each step and the kernel document behind it (the sysfs files are described in
Documentation/ABI/testing/sysfs-devices-power and .../sysfs-bus-pci):

- `sleep`: write "auto" to `<dev>/power/control`. PCI devices start with runtime PM forbidden
  (pci_pm_init() calls pm_runtime_forbid(); user space, not the driver, allows it:
  Documentation/power/pci.rst, section 3.2), so without this write nothing ever suspends. The PM
  core then suspends the device once its usage counter is zero (Documentation/power/runtime_pm.rst,
  section 2, rule (3)) and its autosuspend delay has passed (section 9,
  `power/autosuspend_delay_ms`); wait for `power/runtime_status` to read "suspended". A driver
  that keeps a usage reference (an open file, a driver without runtime PM support) keeps it
  "active": a timeout, with the status in the error.
- `active` / `idle`: write "on": runtime PM forbidden, and a suspended device is resumed
  (sysfs-devices-power, `control`); wait for "active". The kernel cannot tell active from idle:
  the read-back labels a running device with the last commanded of the two.
- `off`: only with `allow_remove`: write 1 to `<dev>/remove` (the device leaves the bus; power is
  then the slot's/driver's business). Any powered state after `off` rescans the bus (write 1 to
  `/sys/bus/pci/rescan`, sysfs-bus-pci) and waits for the device to come back.
- stop (`async_close`): `power/control` gets back the value found before the first write.

Recovery (`RecoverableAccelerator`, `pci_sysfs.PciSteps`): `rebind` unbinds the bound driver and
binds it again (or `driver_name` when none is bound); `pci_rescan` removes the device and rescans
the bus (whatever `allow_remove` says: that option is about `off` as a commanded state, while a
rescan is the watchdog's step for a wake that did not come through). Both end with
`power/control` = "on", as a wake wants, and return once the device is back; the watchdog reads
the state back as usual.

`async_read_state`: device directory missing -> off; runtime_status active -> active/idle,
suspended -> sleep, suspending -> suspending, resuming -> waking, anything else -> unknown.
All sysfs I/O runs in a worker thread; waits poll with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from ..accel import AccelState
from ._poll import PollTimeout, poll_until
from .base import DriverError, options_of
from .pci_sysfs import ControlKeeper, PciOptions, PciSteps
from .preflight_checks import Problem

_STATUS_TO_STATE = {
    "suspended": AccelState.SLEEP,
    "suspending": AccelState.SUSPENDING,
    "resuming": AccelState.WAKING,
}


class PcieRuntimePmOptions(PciOptions):
    """PCIe device whose runtime PM the driver controls."""

    allow_remove: bool = Field(
        False, description="Allow `off` by removing the device from the bus (rescan to return).")
    driver_name: str | None = Field(
        None, description="Driver to bind in a rebind when none is bound (default: the bound one).")


class PcieRuntimePmAccelerator:
    """AcceleratorDriver over /sys/bus/pci/devices/<address>/power/{control,runtime_status}."""

    kind: ClassVar[str] = "pcie_runtime_pm"

    @staticmethod
    def preflight(options: PcieRuntimePmOptions | Mapping[str, Any]) -> list[Problem]:
        """`check --here`: the PCI function is enumerated (blocking stat)."""
        opts = options_of(PcieRuntimePmOptions, options)
        problem = opts.presence_problem()
        return [problem] if problem else []

    def __init__(self, options: PcieRuntimePmOptions | Mapping[str, Any]) -> None:
        self.options = options_of(PcieRuntimePmOptions, options)
        self.counters: dict[str, int] = dict.fromkeys(
            ("control_writes", "removes", "rescans", "settle_timeouts", "rebinds"), 0)
        self.steps = PciSteps(self.options, self.counters)
        self.pci = self.steps.pci
        self.device = self.pci.path
        self.control = ControlKeeper(self.pci)
        self._running_label = AccelState.ACTIVE
        self._lock = asyncio.Lock()

    async def async_open(self) -> None:
        """Check the device (or, with allow_remove, the rescan file) is there; remember its
        power/control."""
        if await asyncio.to_thread(self.device.is_dir):
            if not await asyncio.to_thread((self.device / "power" / "control").exists):
                raise DriverError(f"{self.device} has no power/control (runtime PM unsupported)")
            await self.control.remember()
            return
        if not self.options.allow_remove:
            raise DriverError(f"PCI device {self.device} not found")

    async def async_close(self) -> None:
        """Give power/control back the value found at open (or before the first write)."""
        async with self._lock:
            await self.control.restore()
            self.counters["control_writes"] = self.control.writes

    async def async_set_state(self, target: AccelState) -> None:
        async with self._lock:
            if target is AccelState.OFF:
                await self._remove()
                return
            if target not in (AccelState.ACTIVE, AccelState.IDLE, AccelState.SLEEP):
                raise DriverError(f"cannot command transitional state {target.value!r}")
            if not await self.steps.present():
                if not self.options.allow_remove:
                    raise DriverError(f"PCI device {self.device} not found")
                await self.steps.rescan()
            if target is AccelState.SLEEP:
                await self._write_control("auto")
                await self._settle("suspended")
            else:
                await self._write_control("on")
                await self._settle("active")
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
            if action == "rebind":
                await self.steps.rebind(self.options.driver_name)
            elif action == "pci_rescan":
                await self.steps.remove()
                await self.steps.rescan()
            else:
                raise DriverError(f"PCIe runtime PM accelerator cannot {action}")
            # A new device or driver starts with whatever runtime-PM default the kernel gives
            # it; the watchdog recovers a wake, so forbid runtime suspend again.
            await self._write_control("on")
            self._running_label = AccelState.ACTIVE

    # -- steps ---------------------------------------------------------------------------------

    async def _write_control(self, value: str) -> None:
        await self.control.set(value)  # idempotent: no write when already set
        self.counters["control_writes"] = self.control.writes

    async def _remove(self) -> None:
        if not self.options.allow_remove:
            raise DriverError(
                "state 'off' needs allow_remove = true (it removes the device from the bus)")
        await self.steps.remove()

    async def _settle(self, want: str) -> None:
        try:
            await poll_until(lambda: asyncio.to_thread(self._read_status), lambda s: s == want,
                             timeout_s=self.steps.settle_s, interval_s=self.steps.poll_s,
                             what=f"{self.options.address} {want}")
        except PollTimeout as exc:
            self.counters["settle_timeouts"] += 1
            raise DriverError(f"{self.options.address} not {want} after "
                              f"{self.options.settle_timeout_ms} ms (runtime_status {exc.last!r})") from None

    def _read_status(self) -> str | None:
        """runtime_status, None when the device is absent, "error:..." when unreadable."""
        if not self.device.is_dir():
            return None
        status = self.pci.runtime_status()
        return "error:unreadable" if status is None else status
