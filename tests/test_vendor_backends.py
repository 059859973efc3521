"""Vendor sleep backends: Hailo (D3hot on last close) and Coral (no runtime PM: unbind / rail)
against a temp sysfs tree with a thread playing the PM core, the PCI core and the vendor driver
by their documents and sources (tests/fake_pci_kernel.py: it watches /proc for open handles of
the device node); the rail is a fake gpiod line request (the GPIO seam); Jetson against a real
script playing the module."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
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

from .fake_pci_kernel import FakePciKernel
from .helpers import until
from .test_accel_drivers import FakeLineRequest

wait_until = functools.partial(until, timeout=5.0)

ADDR = "0000:03:00.0"




@pytest.fixture
def hailo_pci(tmp_path: Path) -> Iterator[FakePciKernel]:
    """The Hailo driver as its source behaves: D3hot on the last close, no runtime PM."""
    with FakePciKernel(tmp_path / "pci", ADDR, "hailo", "hailort") as pci:
        yield pci


def hailo(pci: FakePciKernel, cls: type[HailoAccelerator] = HailoAccelerator, **extra: object) -> HailoAccelerator:
    return cls(HailoOptions.model_validate({
        "address": ADDR, "root": pci.devices, "drivers_root": pci.drivers, "rescan_path": pci.rescan,
        "device_node": pci.node, "settle_timeout_ms": 1500, **extra}))


def coral(pci: FakePciKernel, cls: type[CoralAccelerator] = CoralAccelerator, **extra: object) -> CoralAccelerator:
    return cls(CoralOptions.model_validate({
        "address": ADDR, "root": pci.devices, "drivers_root": pci.drivers, "rescan_path": pci.rescan,
        "settle_timeout_ms": 1500, **extra}))


class NeverAllowsRuntimePm(HailoAccelerator):
    """The backend as it was before: it never wrote power/control = auto."""

    async def _allow_runtime_pm(self) -> None:
        return None


class CoralNeverAllowsRuntimePm(CoralAccelerator):
    async def _allow_runtime_pm(self) -> None:
        return None


def control(pci: FakePciKernel) -> str:
    return pci.read("power/control")


def test_registry_knows_the_vendor_backends() -> None:
    for name in ("hailo_pcie", "coral_pcie", "jetson"):
        assert name in registry.known_names("accelerator")
        assert registry.load("accelerator", name).kind == name  # type: ignore[attr-defined]


async def test_hailo_d0_while_the_daemon_holds_the_node_d3hot_when_the_last_handle_closes(
        hailo_pci: FakePciKernel) -> None:
    accel = hailo(hailo_pci)
    assert isinstance(accel, AcceleratorDriver) and isinstance(accel, RecoverableAccelerator)
    await accel.async_open()
    assert await accel.async_read_state() is AccelState.SLEEP  # D3hot after probe, until opened
    assert hailo_pci.status == "active"  # the PM core's view: the driver never uses runtime PM
    await accel.async_set_state(AccelState.ACTIVE)
    assert await accel.async_read_state() is AccelState.ACTIVE and hailo_pci.power == "D0"
    await accel.async_set_state(AccelState.SLEEP)
    assert await accel.async_read_state() is AccelState.SLEEP and hailo_pci.power == "D3hot"
    assert await asyncio.to_thread(control, hailo_pci) == "auto"
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
    assert await asyncio.to_thread(control, hailo_pci) == "on"  # as found
    await wait_until(lambda: hailo_pci.control_writes == ["auto", "on"], what="the kernel saw auto, then on")


async def test_hailo_sleep_without_control_auto_times_out_under_the_kernels_rules(tmp_path: Path) -> None:
    """A Hailo driver that does use runtime PM (one usage reference per open file): the PM core
    suspends it only once user space has written control=auto. The old backend never did."""
    with FakePciKernel(tmp_path / "pci", ADDR, "hailo", "runtime") as pci:
        old = hailo(pci, NeverAllowsRuntimePm, settle_timeout_ms=400)
        await old.async_open()
        await old.async_set_state(AccelState.ACTIVE)
        with pytest.raises(DriverError, match=r"not reached after 0\.4 s"):
            await old.async_set_state(AccelState.SLEEP)
        assert pci.status == "active" and await asyncio.to_thread(control, pci) == "on"
        await old.async_close()

        fixed = hailo(pci)
        await fixed.async_open()
        await fixed.async_set_state(AccelState.ACTIVE)
        assert await fixed.async_read_state() is AccelState.ACTIVE
        await fixed.async_set_state(AccelState.SLEEP)
        assert await fixed.async_read_state() is AccelState.SLEEP
        assert (pci.status, pci.power) == ("suspended", "D3hot")  # no D3cold on this platform
        await fixed.async_set_state(AccelState.ACTIVE)  # the open resumes it (a usage reference)
        assert pci.status == "active"
        await fixed.async_set_state(AccelState.SLEEP)
        await fixed.async_close()
        assert await asyncio.to_thread(control, pci) == "on"  # restored: the PM core resumes it
        await wait_until(lambda: pci.status == "active", what="resumed by control=on")


@pytest.mark.parametrize(("platform_d3cold", "allowed", "expected"),
                         [(False, "1", "D3hot"), (True, "1", "D3cold"), (True, "0", "D3hot")])
async def test_hailo_d3cold_only_where_the_platform_allows_it(
        tmp_path: Path, platform_d3cold: bool, allowed: str, expected: str) -> None:
    with FakePciKernel(tmp_path / "pci", ADDR, "hailo", "runtime", platform_d3cold=platform_d3cold) as pci:
        await asyncio.to_thread((pci.device / "d3cold_allowed").write_text, allowed)
        accel = hailo(pci)
        await accel.async_open()
        await accel.async_set_state(AccelState.SLEEP)
        assert pci.power == expected and await accel.async_read_state() is AccelState.SLEEP
        await accel.async_close()


async def test_hailo_recovery_rungs_rebind_and_rescan(hailo_pci: FakePciKernel) -> None:
    accel = hailo(hailo_pci)
    await accel.async_open()
    assert accel.recovery_actions() == {"rebind", "pci_rescan"}  # no rail configured
    hailo_pci.stuck = True  # firmware hung: open does not bring D0
    with pytest.raises(DriverError, match="power_state D0"):
        await accel.async_set_state(AccelState.ACTIVE)
    await accel.async_recover("rebind")
    assert [e for e in hailo_pci.events if e in ("bind", "unbind")][-2:] == ["unbind", "bind"]
    assert accel.counters["rebinds"] == 1
    await accel.async_set_state(AccelState.ACTIVE)
    assert await accel.async_read_state() is AccelState.ACTIVE
    await accel.async_recover("pci_rescan")
    assert "removed" in hailo_pci.events and "rescan" in hailo_pci.events
    await accel.async_set_state(AccelState.ACTIVE)
    assert await accel.async_read_state() is AccelState.ACTIVE
    with pytest.raises(DriverError, match="cannot rail_cycle"):
        await accel.async_recover("rail_cycle")
    await accel.async_close()


async def test_coral_sleep_is_unbind_and_runtime_suspend_read_back_from_sysfs(tmp_path: Path) -> None:
    with FakePciKernel(tmp_path / "pci", ADDR, "apex", "apex") as pci:
        old = coral(pci, CoralNeverAllowsRuntimePm, settle_timeout_ms=300)
        await old.async_open()
        with pytest.raises(DriverError, match="unbound and runtime-suspended"):  # control=on: stays active
            await old.async_set_state(AccelState.SLEEP)
        await old.async_set_state(AccelState.ACTIVE)
        accel = coral(pci)
        await accel.async_open()
        assert await accel.async_read_state() is AccelState.ACTIVE
        await accel.async_set_state(AccelState.SLEEP)
        assert await accel.async_read_state() is AccelState.SLEEP and not pci.bound
        assert (pci.status, await asyncio.to_thread(control, pci)) == ("suspended", "auto")
        # Read back from sysfs, not from the command: forbid runtime PM behind its back and the
        # unbound function resumes; it is no longer read as asleep.
        await asyncio.to_thread((pci.device / "power" / "control").write_text, "on\n")
        await wait_until(lambda: pci.status == "active", what="resumed")
        assert await accel.async_read_state() is AccelState.UNKNOWN
        await accel.async_set_state(AccelState.IDLE)
        assert await accel.async_read_state() is AccelState.IDLE and pci.bound
        with pytest.raises(DriverError, match="needs a rail"):
            await accel.async_set_state(AccelState.OFF)
        await accel.async_close()
        assert await asyncio.to_thread(control, pci) == "on"


async def test_coral_with_a_rail_cuts_power_for_off_and_comes_back_by_rescan_and_bind(tmp_path: Path) -> None:
    fake = FakeLineRequest(enable=5, pg=None)
    fake.values[5] = Value.ACTIVE
    with FakePciKernel(tmp_path / "pci", ADDR, "apex", "apex", rail=fake) as pci:
        accel = coral(pci, rail=GpioOptions(enable_line=5), rail_off_ms=20)
        accel = CoralAccelerator(accel.options, rail_opener=lambda o: fake)
        await accel.async_open()
        await accel.async_set_state(AccelState.SLEEP)  # sleep is a runtime suspend: the rail stays on
        assert fake.values[5] is Value.ACTIVE and await accel.async_read_state() is AccelState.SLEEP
        await accel.async_set_state(AccelState.OFF)
        assert fake.values[5] is Value.INACTIVE and not await asyncio.to_thread(pci.device.exists)
        assert await accel.async_read_state() is AccelState.OFF
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
