"""A PCI function in a temp sysfs tree, with a thread playing the kernel by its documents, not by
any backend's assumptions:

- the PM core (Documentation/power/runtime_pm.rst; Documentation/ABI/testing/sysfs-devices-power):
  a usage counter; `power/control` "on" is pm_runtime_forbid() and holds one usage reference,
  "auto" drops it; the device runtime-suspends only with a zero usage counter and, for a driver
  that uses autosuspend, after `power/autosuspend_delay_ms` of inactivity (a negative delay
  forbids it, like "on"); `power/runtime_status` goes active -> suspending -> suspended and
  suspended -> resuming -> active, one step per tick; a usage reference resumes it;
- the PCI core (Documentation/power/pci.rst, section 3.2; drivers/pci/pci-driver.c):
  pci_pm_init() forbids runtime PM, so a new (or rescanned) function reads control "on";
  local_pci_probe() takes a usage reference that a driver with runtime PM drops in its probe and
  that pci_device_remove() drops at unbind; an unbound function is left in D0 when it
  runtime-suspends, and reaches D3cold only when the platform supports D3cold and
  `d3cold_allowed` is 1 (Documentation/ABI/testing/sysfs-bus-pci); a bound runtime-PM driver's
  function goes to D3hot, or D3cold on such a platform; `power_state` shows the PCI state;
- the driver, one of:
  - "hailort" (hailo-ai/hailort-drivers linux/pcie/src/fops.c, pcie.c): no runtime-PM calls
    (its probe reference stays); pci_set_power_state(D3hot) after probe and on the last close
    of the device node, D0 on open; `stuck` = firmware hung, an open does not bring D0 until
    the driver is rebound;
  - "apex" (google/gasket-driver): no runtime-PM calls, the function stays D0 while bound;
  - "runtime": a driver that uses runtime PM with autosuspend: drops the probe reference,
    holds one reference per open handle of the device node;
- the driver core and bus: drivers/<name>/bind and unbind, the device's `driver` link, `remove`,
  the bus `rescan` (which probes the driver again), and an optional rail (a fake GPIO request):
  with the rail off the function is gone until a rescan with the rail on.

`extra_usage` is a kernel user holding a usage reference (a busy device). Every change is logged
in `events`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Literal

from gpiod.line import Value

from cerebellumd.drivers.pci_sysfs import holders

DriverKind = Literal["hailort", "apex", "runtime"]


class FakePciKernel:
    def __init__(self, base: Path, address: str, driver: str, kind: DriverKind, *,
                 platform_d3cold: bool = False, autosuspend_delay_ms: int = 50,
                 rail: object | None = None, tick_s: float = 0.005) -> None:
        self.base = base
        self.address = address
        self.devices = base / "devices"
        self.drivers = base / "drivers"
        self.device = self.devices / address
        self.rescan = base / "rescan"
        self.node = base / "dev_node"
        self.driver = driver
        self.driver_dir = self.drivers / driver
        self.kind: DriverKind = kind
        self.platform_d3cold = platform_d3cold
        self.default_delay_ms = autosuspend_delay_ms
        self.rail = rail
        self.tick_s = tick_s
        self.stuck = False
        self.extra_usage = 0
        self.events: list[str] = []
        self.control_writes: list[str] = []  # every value seen in power/control, in order
        self._lock = threading.Lock()
        self.driver_dir.mkdir(parents=True)
        for f in ("bind", "unbind"):
            (self.driver_dir / f).write_text("")
        self.devices.mkdir(parents=True, exist_ok=True)
        self.rescan.write_text("0\n")
        self.node.write_text("")
        self._make_device()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.events.clear()

    # -- state ---------------------------------------------------------------------------------

    def _make_device(self) -> None:
        """A new function as the PCI core creates it, probed by the driver: built aside and
        renamed into place so that it appears whole."""
        staging = self.devices / f".new-{self.address}"
        (staging / "power").mkdir(parents=True, exist_ok=True)
        (staging / "power" / "control").write_text("on\n")  # pci_pm_init(): pm_runtime_forbid()
        (staging / "power" / "runtime_status").write_text("active\n")
        (staging / "power" / "autosuspend_delay_ms").write_text(f"{self.default_delay_ms}\n")
        (staging / "power_state").write_text("D0\n")
        (staging / "d3cold_allowed").write_text("1\n")
        (staging / "remove").write_text("0\n")
        if self.device.exists():
            self._delete_device()
        staging.rename(self.device)
        self.status = "active"
        self.power = "D0"
        self.control = "on"
        self.delay_ms = self.default_delay_ms
        self.last_busy = time.monotonic()
        self.handles = 0
        self.bound = False
        self._probe()

    def _probe(self) -> None:
        link = self.device / "driver"
        if not link.is_symlink():
            link.symlink_to(self.driver_dir)
        self.bound = True
        self.stuck = False
        self.events.append("bind")
        if self.kind == "hailort":  # firmware loaded: "low power state, until the user opens the device"
            self._set_power("D3hot")

    def _unbind(self) -> None:
        link = self.device / "driver"
        if link.is_symlink():
            link.unlink()
        self.bound = False
        self.events.append("unbind")
        if self.power == "D0":  # pci_device_remove(): "If the device is still on, ... unknown"
            self._set_power("unknown")

    def _delete_device(self) -> None:
        for p in sorted(self.device.rglob("*"), reverse=True):
            p.unlink() if p.is_symlink() or p.is_file() else p.rmdir()
        self.device.rmdir()

    def _set_power(self, value: str) -> None:
        if value != self.power:
            self.power = value
            self.events.append(value)
        self._publish("power_state", value)

    def _set_status(self, value: str) -> None:
        if value != self.status:
            self.status = value
            self.events.append(value)
        self._publish("power/runtime_status", value)

    def _publish(self, name: str, value: str) -> None:
        path = self.device / name
        if path.read_text().strip() != value:  # replaced atomically: readers never see it empty
            tmp = path.with_name(f".{path.name}")
            tmp.write_text(value + "\n")
            tmp.replace(path)

    def usage(self) -> int:
        """The PM core's usage counter as the documents define it."""
        count = self.extra_usage
        if self.control == "on":
            count += 1  # pm_runtime_forbid()
        if self.bound:
            count += self.handles if self.kind == "runtime" else 1  # the probe reference stays
        return count

    def powered(self) -> bool:
        rail = self.rail
        if rail is None:
            return True
        return bool(rail.values[rail.enable] is Value.ACTIVE)  # type: ignore[attr-defined]

    # -- the kernel's thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            with self._lock:
                self._tick()

    def _tick(self) -> None:
        if self.rescan.read_text().strip() == "1":
            self.rescan.write_text("0\n")
            if self.powered() and not self.device.is_dir():
                self.events.append("rescan")  # logged first: a backend may see the effect at once
                self._make_device()
        if not self.device.is_dir():
            for op in ("bind", "unbind"):
                (self.driver_dir / op).write_text("")
            return
        for op in ("bind", "unbind"):
            f = self.driver_dir / op
            if f.read_text().strip() == self.address:
                f.write_text("")
                if op == "bind" and not self.bound:
                    self._probe()
                elif op == "unbind" and self.bound:
                    self._unbind()
        if (self.device / "remove").read_text().strip() == "1" or not self.powered():
            self.events.append("removed")
            self._delete_device()
            return
        self._read_user_files()
        self._driver_tick()
        self._pm_core_tick()

    def _read_user_files(self) -> None:
        control = (self.device / "power" / "control").read_text().strip()
        if control in ("on", "auto") and control != self.control:  # anything else: EINVAL, kept
            self.control = control
            self.control_writes.append(control)
        with contextlib.suppress(ValueError):  # a write in progress: keep the last value
            self.delay_ms = int((self.device / "power" / "autosuspend_delay_ms").read_text())

    def _driver_tick(self) -> None:
        if not self.bound or self.kind == "apex":
            self.handles = 0
            return
        before = self.handles
        self.handles = len(holders(self.node))  # slow (scans /proc)
        if self.kind == "hailort" and not self.stuck:
            if self.handles and not before:
                self._set_power("D0")
            elif before and not self.handles:
                self._set_power("D3hot")
        if self.handles:
            self.last_busy = time.monotonic()

    def _pm_core_tick(self) -> None:
        usage = self.usage()
        now = time.monotonic()
        if usage:
            self.last_busy = now
        # The callback changes the PCI state; then the PM core records the new status.
        if self.status == "suspending":
            self._set_power(self._suspended_power())
            self._set_status("suspended")
        elif self.status == "resuming":
            self._set_power("D0")
            self._set_status("active")
            self.last_busy = now
        elif self.status == "suspended" and usage:
            self._set_status("resuming")
        elif self.status == "active" and not usage and self._delay_passed(now):
            self._set_status("suspending")

    def _delay_passed(self, now: float) -> bool:
        if not (self.bound and self.kind == "runtime"):
            return True  # no autosuspend in use: the idle check suspends at once
        if self.delay_ms < 0:
            return False  # "Negative values will prevent the device from being suspended"
        return (now - self.last_busy) * 1000 >= self.delay_ms

    def _suspended_power(self) -> str:
        d3cold = self.platform_d3cold and (self.device / "d3cold_allowed").read_text().strip() == "1"
        if not self.bound:  # unbound: left as it is unless the bridge above cuts the power
            return "D3cold" if d3cold else self.power
        if self.kind == "runtime":
            return "D3cold" if d3cold else "D3hot"
        return self.power  # a driver without runtime PM callbacks: the PCI state is its own

    # -- test side -----------------------------------------------------------------------------

    def read(self, name: str) -> str:
        return (self.device / name).read_text().strip()

    def start(self) -> FakePciKernel:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> FakePciKernel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
