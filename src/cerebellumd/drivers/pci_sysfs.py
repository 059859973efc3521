"""PCI sysfs operations shared by every PCIe accelerator backend (`pcie_runtime_pm`, Hailo,
Coral): the options they share, driver bind/unbind, device remove, bus rescan, runtime PM
(`power/control`, `power/runtime_status`), the PCI power state, and who holds a device node open.

The kernel documents behind each step:

- bind/unbind: Documentation/ABI/testing/sysfs-bus-pci (`/sys/bus/pci/drivers/.../bind`,
  `unbind`); remove and rescan: the same file (`/sys/bus/pci/devices/.../remove`,
  `/sys/bus/pci/rescan`).
- `power/control` ("on" forbids runtime PM, "auto" allows it; writing "on" to a suspended device
  resumes it) and `power/autosuspend_delay_ms`: Documentation/ABI/testing/sysfs-devices-power.
  `power/runtime_status` reads "active", "suspended", "suspending", "resuming", "error" or
  "unsupported" (the same file, added in 2010).
- PCI devices start with runtime PM *forbidden*: pci_pm_init() calls pm_runtime_forbid(), and a
  driver must not call pm_runtime_allow() itself: user space does it by writing "auto"
  (Documentation/power/pci.rst, section 3.2 "Device Runtime Power Management"). The PM core
  suspends a device only with a zero usage counter (Documentation/power/runtime_pm.rst,
  section 2, rule (3)), after the autosuspend delay (section 9).
- `power_state` (D0, D1, D2, D3hot, D3cold, unknown, error) is the PCI core's own power state of
  the function (Documentation/ABI/testing/sysfs-bus-pci, added November 2020); `d3cold_allowed`
  gates D3cold, which needs platform support too (same file). A driver that sets D3hot itself
  with pci_set_power_state() (the Hailo driver does) changes `power_state`, not
  `power/runtime_status`.

Blocking file I/O: every `PciDevice` method runs in a worker thread (`asyncio.to_thread`);
`PciSteps` is the async side and polls with a deadline (`_poll.poll_until`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ._poll import poll_blocking
from .base import DriverError
from .preflight_checks import Problem

PCI_ADDRESS = r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$"
#: PCI power states that mean the function is in D3 (BARs off): asleep in PCI terms.
D3_STATES = frozenset({"D3hot", "D3cold"})


class PciOptions(BaseModel):
    """Where a PCI function lives in sysfs and how long its steps may take (shared by the PCIe
    accelerator backends)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(..., pattern=PCI_ADDRESS,
                         description="PCI address, domain:bus:device.function (e.g. 0000:01:00.0).")
    root: Path = Field(Path("/sys/bus/pci/devices"), description="PCI devices directory.")
    drivers_root: Path = Field(Path("/sys/bus/pci/drivers"), description="PCI drivers directory (bind, rebind).")
    rescan_path: Path | None = Field(None, description="Bus rescan file; default <root>/../rescan.")
    settle_timeout_ms: int = Field(
        3000, gt=0, description="How long a rescan, bind, remove or power state may take to read back.")
    poll_interval_ms: int = Field(10, gt=0, description="sysfs polling period while waiting.")

    def pci(self) -> PciDevice:
        return PciDevice(self.address, self.root, self.drivers_root, self.rescan_path)

    def presence_problem(self) -> Problem | None:
        """`check --here` (blocking stat): the function should be enumerated now. A warning, not
        an error: a module whose rail is off is legitimately absent."""
        if (self.root / self.address).exists():
            return None
        return "warning", (f"PCI device {self.address} is not present under {self.root} "
                           "(its rail off, or another address: lspci -D)")


@dataclass(frozen=True, slots=True)
class PciDevice:
    address: str  # domain:bus:device.function
    root: Path = Path("/sys/bus/pci/devices")
    drivers_root: Path = Path("/sys/bus/pci/drivers")
    rescan_path: Path | None = None

    @property
    def path(self) -> Path:
        return self.root / self.address

    @property
    def rescan(self) -> Path:
        return self.rescan_path or self.root.parent / "rescan"

    # -- blocking --------------------------------------------------------------------------

    def present(self) -> bool:
        return self.path.is_dir()

    def bound_driver(self) -> str | None:
        link = self.path / "driver"
        try:
            return Path(os.readlink(link)).name
        except OSError:
            return None

    def runtime_status(self) -> str | None:
        """power/runtime_status; None when the device is absent or has no runtime PM file."""
        return self._word(self.path / "power" / "runtime_status")

    def control(self) -> str | None:
        """power/control ("on" or "auto"); None when absent."""
        return self._word(self.path / "power" / "control")

    def set_control(self, value: str) -> bool:
        """Write power/control unless it already reads `value`; True when written."""
        if self.control() == value:
            return False
        self.write(self.path / "power" / "control", value)
        return True

    def power_state(self) -> str | None:
        """The PCI power state (`power_state`: D0 ... D3cold); None when the kernel has no such
        file or the device is absent."""
        return self._word(self.path / "power_state")

    def low_power(self) -> bool:
        """Suspended by the PM core, or put in D3 by its driver: either one, read from sysfs."""
        return self.runtime_status() == "suspended" or self.power_state() in D3_STATES

    @staticmethod
    def _word(path: Path) -> str | None:
        try:
            words = path.read_text(encoding="ascii", errors="replace").split()
        except OSError:
            return None
        return words[0] if words else ""

    def write(self, path: Path, value: str) -> None:
        try:
            path.write_text(value)
        except OSError as exc:
            raise DriverError(f"writing {value!r} to {path} failed: {exc}") from exc

    def unbind(self) -> None:
        drv = self.bound_driver()
        if drv is not None:
            self.write(self.drivers_root / drv / "unbind", self.address)

    def bind(self, driver: str) -> None:
        if self.bound_driver() is None:
            self.write(self.drivers_root / driver / "bind", self.address)

    def remove(self) -> None:
        if self.present():
            self.write(self.path / "remove", "1")

    def rescan_bus(self) -> None:
        self.write(self.rescan, "1")


def holders(node: Path, proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, command name) of the processes with `node` open: the ones keeping a Hailo in D0.
    Processes we may not inspect are skipped (root sees all)."""
    target = str(node)
    found: list[tuple[int, str]] = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    comm = (entry / "comm").read_text().strip()
                    found.append((int(entry.name), comm))
                    break
            except OSError:
                continue
    return found


class PciSteps:
    """The PCI steps every PCIe backend takes, each waiting (with the options' settle timeout)
    until sysfs shows it done: bind, unbind, rebind, remove, rescan. Counts what it did."""

    def __init__(self, options: PciOptions, counters: dict[str, int] | None = None) -> None:
        self.pci = options.pci()
        self.settle_s = options.settle_timeout_ms / 1000
        self.poll_s = options.poll_interval_ms / 1000
        self.counters = counters if counters is not None else {}
        for key in ("rebinds", "removes", "rescans"):
            self.counters.setdefault(key, 0)

    async def wait(self, check: Callable[[], bool], what: str) -> None:
        await poll_blocking(check, timeout_s=self.settle_s, interval_s=self.poll_s, what=f"{self.pci.address} {what}")

    async def present(self) -> bool:
        return await asyncio.to_thread(self.pci.present)

    async def bound_driver(self) -> str | None:
        return await asyncio.to_thread(self.pci.bound_driver)

    async def unbind(self) -> None:
        await asyncio.to_thread(self.pci.unbind)
        await self.wait(lambda: self.pci.bound_driver() is None, "unbound")

    async def bind(self, driver: str) -> None:
        if await self.bound_driver() is None:
            await asyncio.to_thread(self.pci.bind, driver)
        await self.wait(lambda: self.pci.bound_driver() is not None, f"bound to {driver}")

    async def rebind(self, fallback_driver: str | None) -> None:
        """Unbind the bound driver and bind it again (or `fallback_driver` when none is bound)."""
        driver = await self.bound_driver() or fallback_driver
        if driver is None:
            raise DriverError(f"cannot rebind {self.pci.address}: no driver bound and no driver_name")
        await self.unbind()
        await self.bind(driver)
        self.counters["rebinds"] += 1

    async def remove(self, *, unbind_first: bool = False) -> None:
        """Take the function off the bus (unbound first when asked) and wait until it is gone."""
        if not await self.present():
            return
        if unbind_first:
            await asyncio.to_thread(self.pci.unbind)
        await asyncio.to_thread(self.pci.remove)
        self.counters["removes"] += 1
        await self.wait(lambda: not self.pci.present(), "removed")

    async def rescan(self) -> None:
        """Rescan the bus and wait until the function is back with its power files."""
        await asyncio.to_thread(self.pci.rescan_bus)
        self.counters["rescans"] += 1
        await self.wait(lambda: (self.pci.path / "power" / "control").exists(), "present after rescan")


class ControlKeeper:
    """power/control as the backend found it: remembered before the first write, written back
    by `restore` at stop (when the device is there to take it)."""

    def __init__(self, pci: PciDevice) -> None:
        self.pci = pci
        self.found: str | None = None
        self.writes = 0

    async def remember(self) -> None:
        if self.found is None:
            self.found = await asyncio.to_thread(self.pci.control)

    async def set(self, value: str) -> None:
        await self.remember()
        if await asyncio.to_thread(self.pci.set_control, value):
            self.writes += 1

    async def restore(self) -> None:
        if self.found in ("on", "auto") and await asyncio.to_thread(self.pci.present):
            await self.set(self.found)
