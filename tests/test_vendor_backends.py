"""Vendor sleep backends: Hailo (D3hot on last close) and Coral (no runtime PM: unbind / rail)
against a temp sysfs tree with a thread playing the PCI core and the vendor driver (it watches
/proc for open handles of the device node, as the real driver's refcount does); the rail is a
fake gpiod line request (the GPIO seam); Jetson against a real script playing the module."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiod.line import Value

from cerebellumd.accel import AccelState
from cerebellumd.drivers import registry
from cerebellumd.drivers.accel_coral import CoralAccelerator, CoralOptions
from cerebellumd.drivers.accel_gpio import GpioOptions
from cerebellumd.drivers.accel_hailo import HailoAccelerator, HailoOptions
from cerebellumd.drivers.accel_jetson import JetsonAccelerator, JetsonOptions
from cerebellumd.drivers.base import AcceleratorDriver, DriverError, RecoverableAccelerator
from cerebellumd.drivers.pci_sysfs import holders

from .test_accel_drivers import FakeLineRequest

ADDR = "0000:03:00.0"




class FakePci:
    """sysfs of one PCI device and its driver. runtime_status follows the open handles of the
    device node when `runtime_pm` (Hailo), else stays active while bound (Coral)."""

    def __init__(self, base: Path, driver: str, *, runtime_pm: bool, rail: FakeLineRequest | None = None) -> None:
        self.devices = base / "devices"
        self.drivers = base / "drivers"
        self.device = self.devices / ADDR
        self.rescan = base / "rescan"
        self.node = base / "dev_node"
        self.driver = driver
        self.runtime_pm = runtime_pm
        self.rail = rail
        self.stuck = False  # firmware hung: ignores opens until the driver is rebound
        self.events: list[str] = []
        (self.drivers / driver).mkdir(parents=True)
        for f in ("bind", "unbind"):
            (self.drivers / driver / f).write_text("")
        self.devices.mkdir(parents=True)
        self.rescan.write_text("0")
        self.node.write_text("")
        self.make_device()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def make_device(self) -> None:
        (self.device / "power").mkdir(parents=True, exist_ok=True)
        (self.device / "power" / "runtime_status").write_text("suspended\n" if self.runtime_pm else "active\n")
        (self.device / "remove").write_text("0")
        link = self.device / "driver"
        if not link.is_symlink():
            link.symlink_to(self.drivers / self.driver)

    def powered(self) -> bool:
        return self.rail is None or self.rail.values[self.rail.enable] is Value.ACTIVE

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            if self.rescan.read_text().strip() == "1":
                self.rescan.write_text("0")
                if self.powered():
                    self.events.append("rescan")  # logged first: the driver may see the effect at once
                    self.make_device()
            for op in ("bind", "unbind"):
                f = self.drivers / self.driver / op
                if f.read_text().strip() == ADDR:
                    f.write_text("")
                    self.events.append(op)
                    link = self.device / "driver"
                    if op == "bind" and self.device.is_dir() and not link.is_symlink():
                        link.symlink_to(self.drivers / self.driver)
                        self.stuck = False
                    elif op == "unbind" and link.is_symlink():
                        link.unlink()
            if not self.device.is_dir():
                continue
            if (self.device / "remove").read_text().strip() == "1" or not self.powered():
                self.events.append("removed")
                for p in sorted(self.device.rglob("*"), reverse=True):
                    p.unlink() if p.is_symlink() or p.is_file() else p.rmdir()
                self.device.rmdir()
                continue
            if self.runtime_pm:
                bound = (self.device / "driver").is_symlink()
                held = bool(holders(self.node))  # slow (scans /proc): read `stuck` only after it
                want = "active" if bound and held and not self.stuck else "suspended"
                status = self.device / "power" / "runtime_status"
                if status.read_text().strip() != want:  # replaced atomically: readers never see it empty
                    tmp = self.device / "power" / ".status"
                    tmp.write_text(want + "\n")
                    tmp.replace(status)

    def __enter__(self) -> FakePci:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def hailo_pci(tmp_path: Path) -> Iterator[FakePci]:
    with FakePci(tmp_path / "pci", "hailo", runtime_pm=True) as pci:
        yield pci


def hailo(pci: FakePci, **extra: object) -> HailoAccelerator:
    return HailoAccelerator(HailoOptions(address=ADDR, root=pci.devices, drivers_root=pci.drivers,
                                         rescan_path=pci.rescan, device_node=pci.node,
                                         settle_timeout_ms=1500, **extra))  # type: ignore[arg-type]


def test_registry_knows_the_vendor_backends() -> None:
    for name in ("hailo_pcie", "coral_pcie", "jetson"):
        assert name in registry.known_names("accelerator")
        assert registry.load("accelerator", name).kind == name  # type: ignore[attr-defined]


async def test_hailo_d0_while_the_daemon_holds_the_node_d3hot_when_the_last_handle_closes(
        hailo_pci: FakePci) -> None:
    accel = hailo(hailo_pci)
    assert isinstance(accel, AcceleratorDriver) and isinstance(accel, RecoverableAccelerator)
    await accel.async_open()
    assert await accel.async_read_state() is AccelState.SLEEP
    await accel.async_set_state(AccelState.ACTIVE)
    assert await accel.async_read_state() is AccelState.ACTIVE
    await accel.async_set_state(AccelState.SLEEP)
    assert await accel.async_read_state() is AccelState.SLEEP
    # an application holding the device open keeps it in D0: sleep fails and names it
    app = subprocess.Popen([sys.executable, "-c",
                            f"import sys,time; f=open({str(hailo_pci.node)!r}); print('open', flush=True); "
                            "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        assert await asyncio.to_thread(app.stdout.readline) == "open\n"
        await accel.async_set_state(AccelState.ACTIVE)
        with pytest.raises(DriverError, match=rf"still open by: python[^\[]*\[{app.pid}\]"):
            await accel.async_set_state(AccelState.SLEEP)
        assert await accel.async_read_state() is AccelState.IDLE  # awake, but not for us
        assert accel.counters["settle_timeouts"] == 1
    finally:
        app.kill()
        await asyncio.to_thread(app.wait)
    await accel.async_set_state(AccelState.SLEEP)  # the app is gone: D3hot
    assert await accel.async_read_state() is AccelState.SLEEP
    with pytest.raises(DriverError, match="needs a rail"):
        await accel.async_set_state(AccelState.OFF)
    await accel.async_close()


async def test_hailo_recovery_rungs_rebind_and_rescan(hailo_pci: FakePci) -> None:
    accel = hailo(hailo_pci)
    await accel.async_open()
    assert accel.recovery_actions() == {"rebind", "pci_rescan"}  # no rail configured
    hailo_pci.stuck = True  # firmware hung: open does not bring D0
    with pytest.raises(DriverError, match="runtime_status active"):
        await accel.async_set_state(AccelState.ACTIVE)
    await accel.async_recover("rebind")
    assert hailo_pci.events[-2:] == ["unbind", "bind"] and accel.counters["rebinds"] == 1
    await accel.async_set_state(AccelState.ACTIVE)
    assert await accel.async_read_state() is AccelState.ACTIVE
    await accel.async_recover("pci_rescan")
    assert "removed" in hailo_pci.events and hailo_pci.events[-1] == "rescan"
    await accel.async_set_state(AccelState.ACTIVE)
    assert await accel.async_read_state() is AccelState.ACTIVE
    with pytest.raises(DriverError, match="cannot rail_cycle"):
        await accel.async_recover("rail_cycle")
    await accel.async_close()


async def test_coral_sleep_is_unbind_without_a_rail(tmp_path: Path) -> None:
    with FakePci(tmp_path / "pci", "apex", runtime_pm=False) as pci:
        accel = CoralAccelerator(CoralOptions(address=ADDR, root=pci.devices, drivers_root=pci.drivers,
                                              rescan_path=pci.rescan, settle_timeout_ms=2000))
        await accel.async_open()
        assert await accel.async_read_state() is AccelState.ACTIVE
        await accel.async_set_state(AccelState.SLEEP)
        assert await accel.async_read_state() is AccelState.SLEEP and pci.events == ["unbind"]
        await accel.async_set_state(AccelState.IDLE)
        assert await accel.async_read_state() is AccelState.IDLE and pci.events[-1] == "bind"
        with pytest.raises(DriverError, match="needs a rail"):
            await accel.async_set_state(AccelState.OFF)


async def test_coral_with_a_rail_cuts_power_and_comes_back_by_rescan_and_bind(tmp_path: Path) -> None:
    fake = FakeLineRequest(enable=5, pg=None)
    fake.values[5] = Value.ACTIVE
    with FakePci(tmp_path / "pci", "apex", runtime_pm=False, rail=fake) as pci:
        accel = CoralAccelerator(
            CoralOptions(address=ADDR, root=pci.devices, drivers_root=pci.drivers, rescan_path=pci.rescan,
                         settle_timeout_ms=2000, rail=GpioOptions(enable_line=5), rail_off_ms=20),
            rail_opener=lambda o: fake)
        await accel.async_open()
        await accel.async_set_state(AccelState.SLEEP)  # with a rail, sleep cuts it
        assert fake.values[5] is Value.INACTIVE and not pci.device.exists()
        assert await accel.async_read_state() is AccelState.SLEEP
        await accel.async_set_state(AccelState.ACTIVE)
        assert fake.values[5] is Value.ACTIVE
        assert await accel.async_read_state() is AccelState.ACTIVE
        assert "rescan" in pci.events
        await accel.async_recover("rail_cycle")
        assert accel.counters["rail_cycles"] == 1
        await accel.async_set_state(AccelState.ACTIVE)
        assert await accel.async_read_state() is AccelState.ACTIVE
        await accel.async_set_state(AccelState.OFF)
        assert await accel.async_read_state() is AccelState.OFF
        await accel.async_close()
        assert fake.released


JETSON = """#!/bin/sh
# Plays a Jetson module: state in a file, every command logged.
state="$(dirname "$0")/state"; log="$(dirname "$0")/log"
echo "$*" >> "$log"
case "$1" in
  status) cat "$state" ;;
  suspend) echo suspended > "$state" ;;
  wake) echo active > "$state" ;;
  on) echo active > "$state" ;;
  off) echo off > "$state" ;;
  nvpmodel) exit 0 ;;
  clocks) exit 0 ;;
esac
"""


@pytest.fixture
def jetson_tool(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "jetson.sh"
    script.write_text(JETSON)
    os.chmod(script, 0o755)
    (tmp_path / "state").write_text("active\n")
    return str(script), tmp_path / "log"


def jetson_options(tool: str, **extra: object) -> JetsonOptions:
    return JetsonOptions.model_validate({
        "suspend": [tool, "suspend"], "wake": [tool, "wake"], "status": [tool, "status"],
        "power_on": [tool, "on"], "power_off": [tool, "off"], "nvpmodel": [tool, "nvpmodel", "{mode}"],
        "modes": {"15W": {"id": 0}, "7W": {"id": 1, "description": "draws 4.6-5.3 W"},
                  "MAXN_SUPER": {"id": 2, "needs_reboot": True}},
        "mode": "7W", "reapply": [[tool, "clocks"]], "poll_interval_ms": 10, "settle_timeout_ms": 2000,
        **extra,
    })


async def test_jetson_sc7_and_settings_reapplied_after_every_resume(jetson_tool: tuple[str, Path]) -> None:
    tool, log = jetson_tool
    accel = JetsonAccelerator(jetson_options(tool))
    assert await accel.async_read_state() is AccelState.ACTIVE
    for _ in range(2):
        await accel.async_set_state(AccelState.SLEEP)
        assert await accel.async_read_state() is AccelState.SLEEP
        await accel.async_set_state(AccelState.ACTIVE)
        assert await accel.async_read_state() is AccelState.ACTIVE
    lines = (await asyncio.to_thread(log.read_text)).splitlines()
    assert [line for line in lines if line != "status"] == ["suspend", "wake", "nvpmodel 1", "clocks"] * 2
    assert accel.counters["reapplied"] == 2
    await accel.async_set_state(AccelState.ACTIVE)  # already awake: nothing re-applied
    assert accel.counters["reapplied"] == 2
    assert accel.recovery_actions() == {"rail_cycle"}
    with pytest.raises(DriverError, match="no PCI rungs"):
        await accel.async_recover("rebind")


async def test_jetson_never_switches_a_needs_reboot_mode_live(jetson_tool: tuple[str, Path]) -> None:
    tool, log = jetson_tool
    accel = JetsonAccelerator(jetson_options(tool))
    with pytest.raises(DriverError, match="needs a reboot"):
        await accel.async_set_power_mode("MAXN_SUPER")
    assert accel.counters["refused_modes"] == 1 and accel.mode == "7W"
    await accel.async_set_power_mode("15W")
    assert (await asyncio.to_thread(log.read_text)).splitlines()[-1] == "nvpmodel 0"
    with pytest.raises(ValueError, match="needs a reboot"):
        jetson_options(tool, mode="MAXN_SUPER")
    # the module going off and back on (rail) is re-set up like a resume
    await accel.async_set_state(AccelState.OFF)
    assert await accel.async_read_state() is AccelState.OFF
    await accel.async_set_state(AccelState.IDLE)
    assert await accel.async_read_state() is AccelState.IDLE
    lines = [line for line in (await asyncio.to_thread(log.read_text)).splitlines() if line != "status"]
    assert lines[-3:] == ["on", "nvpmodel 0", "clocks"]
