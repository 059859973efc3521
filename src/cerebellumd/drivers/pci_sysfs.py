"""PCI sysfs operations shared by the PCIe accelerator backends (Hailo, Coral): driver
bind/unbind, device remove, bus rescan, runtime-PM status, and who holds a device node open.

Blocking file I/O: every function here runs in a worker thread (`asyncio.to_thread`); the
async helpers at the bottom poll with a deadline.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import DriverError


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
        try:
            return (self.path / "power" / "runtime_status").read_text(encoding="ascii").strip()
        except OSError:
            return None

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


async def wait_for(check: Callable[[], bool], timeout_s: float, poll_s: float, what: str) -> None:
    """Poll `check` (blocking, run in a thread) until true; DriverError naming `what` after
    `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await asyncio.to_thread(check):
        if loop.time() >= deadline:
            raise DriverError(f"{what} not reached after {timeout_s:.1f} s")
        await asyncio.sleep(poll_s)
