"""Accelerator control drivers: GPIO (fake line request at the gpiod seam + a real-kernel test
that skips without a gpiochip), PCIe runtime PM (temp sysfs tree with a thread playing the
kernel by its documents, tests/fake_pci_kernel.py), external commands (real scripts), companion
MCU (emulator on a pty)."""

from __future__ import annotations

import asyncio
import functools
import glob
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from gpiod.line import Value

from cerebellumd.accel import AccelState
from cerebellumd.drivers.accel_command import CommandAccelerator
from cerebellumd.drivers.accel_gpio import GpioAccelerator, GpioOptions, LineId
from cerebellumd.drivers.accel_mcu import McuAccelerator, McuPowerSensor
from cerebellumd.drivers.accel_pcie import PcieRuntimePmAccelerator, PcieRuntimePmOptions
from cerebellumd.drivers.base import AcceleratorDriver, DriverError, RecoverableAccelerator
from cerebellumd.drivers.mcu_emulator import McuEmulator
from cerebellumd.drivers.mcu_link import McuLink, McuLinkOptions

from .fake_pci_kernel import FakePciKernel
from .helpers import until

# The conditions here settle within seconds: a tighter deadline than the shared default.
wait_until = functools.partial(until, timeout=5.0)


# -- GPIO ----------------------------------------------------------------------------------------


class FakeLineRequest:
    """Implements the gpiod.LineRequest methods the driver uses. Power-good follows the
    enable line after `pg_lag_reads` reads (a rail ramping up), or never if `pg_broken`."""

    def __init__(self, enable: LineId, pg: LineId | None, pg_lag_reads: int = 2) -> None:
        self.values: dict[LineId, Value] = {enable: Value.INACTIVE}
        self.enable, self.pg = enable, pg
        self.lag = pg_lag_reads
        self.pg_broken = False
        self.writes: list[tuple[LineId, Value]] = []
        self.released = False
        self._reads_since_change = 0
        if pg is not None:
            self.values[pg] = Value.INACTIVE

    def get_value(self, line: LineId) -> Value:
        if line == self.pg and not self.pg_broken:
            self._reads_since_change += 1
            if self._reads_since_change > self.lag:
                self.values[line] = self.values[self.enable]
        return self.values[line]

    def set_value(self, line: LineId, value: Value) -> None:
        self.writes.append((line, value))
        self.values[line] = value
        if line == self.enable:
            self._reads_since_change = 0

    def release(self) -> None:
        self.released = True


async def test_gpio_states_with_power_good_readback() -> None:
    fake = FakeLineRequest(enable=17, pg=27)
    accel = GpioAccelerator(GpioOptions(enable_line=17, power_good_line=27), opener=lambda o: fake)
    assert isinstance(accel, AcceleratorDriver)
    await accel.async_open()
    assert await accel.async_read_state() is AccelState.OFF
    await accel.async_set_state(AccelState.ACTIVE)
    assert fake.values[17] is Value.ACTIVE
    assert await accel.async_read_state() is AccelState.ACTIVE
    await accel.async_set_state(AccelState.IDLE)  # same rail level: no write, labelled idle
    assert fake.writes == [(17, Value.ACTIVE)]
    assert await accel.async_read_state() is AccelState.IDLE
    await accel.async_set_state(AccelState.SLEEP)
    assert fake.values[17] is Value.INACTIVE
    assert await accel.async_read_state() is AccelState.SLEEP
    await accel.async_set_state(AccelState.OFF)
    assert len(fake.writes) == 2
    assert await accel.async_read_state() is AccelState.OFF
    await accel.async_close()
    assert fake.released
    assert accel.counters["switch_on"] == 1 and accel.counters["switch_off"] == 1


async def test_gpio_readback_comes_from_power_good_not_the_command() -> None:
    fake = FakeLineRequest(enable="NPU_EN", pg="NPU_PG")
    accel = GpioAccelerator(
        {"enable_line": "NPU_EN", "power_good_line": "NPU_PG", "power_good_timeout_ms": 100},
        opener=lambda o: fake)
    await accel.async_open()
    fake.pg_broken = True
    with pytest.raises(DriverError, match="power-good"):
        await accel.async_set_state(AccelState.ACTIVE)
    assert accel.counters["power_good_timeouts"] == 1
    assert await accel.async_read_state() is AccelState.OFF  # rail did not come up


async def test_gpio_without_power_good_reads_the_enable_line_and_pulses_reset() -> None:
    fake = FakeLineRequest(enable=4, pg=None)
    fake.values[5] = Value.INACTIVE
    accel = GpioAccelerator(
        GpioOptions(enable_line=4, reset_line=5, reset_pulse_ms=1, reset_after_power_on=True),
        opener=lambda o: fake)
    await accel.async_open()
    await accel.async_set_state(AccelState.ACTIVE)
    assert fake.writes == [(4, Value.ACTIVE), (5, Value.ACTIVE), (5, Value.INACTIVE)]
    assert await accel.async_read_state() is AccelState.ACTIVE
    fake.values[4] = Value.INACTIVE  # someone else switched it off: the read-back says so
    assert await accel.async_read_state() is AccelState.OFF
    with pytest.raises(DriverError, match="transitional"):
        await accel.async_set_state(AccelState.WAKING)


async def test_gpio_errors_are_driver_errors() -> None:
    accel = GpioAccelerator(GpioOptions(enable_line=1), opener=lambda o: FakeLineRequest(1, None))
    with pytest.raises(DriverError, match="not open"):
        await accel.async_read_state()
    with pytest.raises(DriverError, match="no reset line"):
        await accel.async_open()
        await accel.async_reset()

    def failing(options: GpioOptions) -> FakeLineRequest:
        raise OSError(16, "Device or resource busy")

    busy = GpioAccelerator(GpioOptions(enable_line=1), opener=failing)
    with pytest.raises(DriverError, match="busy"):
        await busy.async_open()


async def test_gpio_against_a_real_kernel_chip() -> None:
    chip = os.environ.get("CEREBELLUMD_TEST_GPIOCHIP")
    if not glob.glob("/dev/gpiochip*"):
        pytest.skip("no /dev/gpiochip* here (and no gpio-sim): the real-kernel GPIO path "
                    "runs only where a chip exists")
    if chip is None:
        pytest.skip("set CEREBELLUMD_TEST_GPIOCHIP=/dev/gpiochipN (a gpio-sim chip, or one "
                    "with a free line 0) to toggle a real line")
    accel = GpioAccelerator(GpioOptions(chip=chip, enable_line=0, consumer="cerebellumd-test"))
    await accel.async_open()
    try:
        await accel.async_set_state(AccelState.ACTIVE)
        assert await accel.async_read_state() is AccelState.ACTIVE
        await accel.async_set_state(AccelState.OFF)
        assert await accel.async_read_state() is AccelState.OFF
    finally:
        await accel.async_close()


# -- PCIe runtime PM -----------------------------------------------------------------------------

ADDR = "0000:01:00.0"


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[FakePciKernel]:
    """A function whose driver uses runtime PM with autosuspend, under the PM core's rules."""
    with FakePciKernel(tmp_path / "pci", ADDR, "npu", "runtime") as k:
        yield k


def pcie(kernel: FakePciKernel, **extra: object) -> PcieRuntimePmAccelerator:
    return PcieRuntimePmAccelerator(PcieRuntimePmOptions.model_validate(
        {"address": ADDR, "root": kernel.devices, "drivers_root": kernel.drivers, "rescan_path": kernel.rescan,
         **extra}))


async def test_pcie_sleep_wake_and_idempotence(kernel: FakePciKernel) -> None:
    accel = pcie(kernel)
    await accel.async_open()
    assert await accel.async_read_state() is AccelState.ACTIVE
    await accel.async_set_state(AccelState.SLEEP)
    assert await sysfs(kernel.device / "power" / "control") == "auto"
    assert await accel.async_read_state() is AccelState.SLEEP
    assert kernel.power == "D3hot"  # no platform D3cold here
    await accel.async_set_state(AccelState.IDLE)
    assert await accel.async_read_state() is AccelState.IDLE
    await accel.async_set_state(AccelState.ACTIVE)
    assert accel.counters["control_writes"] == 2  # auto, on; the second "on" was not written
    assert await accel.async_read_state() is AccelState.ACTIVE
    with pytest.raises(DriverError, match="allow_remove"):
        await accel.async_set_state(AccelState.OFF)


async def test_pcie_stop_restores_the_control_it_found(kernel: FakePciKernel) -> None:
    await asyncio.to_thread((kernel.device / "power" / "autosuspend_delay_ms").write_text, "0\n")
    accel = pcie(kernel)
    await accel.async_open()  # found: "on" (pci_pm_init forbids runtime PM)
    await accel.async_set_state(AccelState.SLEEP)
    await accel.async_close()
    assert await sysfs(kernel.device / "power" / "control") == "on"
    await wait_until(lambda: kernel.status == "active", what="resumed by control=on")
    assert kernel.control_writes == ["auto", "on"]
    # A device found with runtime PM allowed keeps it allowed after a wake and a stop.
    found_auto = pcie(kernel)
    await found_auto.async_open()
    await asyncio.to_thread((kernel.device / "power" / "control").write_text, "auto\n")
    found_auto.control.found = None
    await found_auto.async_open()
    await found_auto.async_set_state(AccelState.ACTIVE)
    assert await sysfs(kernel.device / "power" / "control") == "on"
    await found_auto.async_close()
    assert await sysfs(kernel.device / "power" / "control") == "auto"


async def test_pcie_busy_device_does_not_suspend(kernel: FakePciKernel) -> None:
    kernel.extra_usage = 1  # a kernel user holds a usage reference
    accel = pcie(kernel, settle_timeout_ms=300)
    with pytest.raises(DriverError, match=r"not suspended.*'active'"):
        await accel.async_set_state(AccelState.SLEEP)
    assert accel.counters["settle_timeouts"] == 1
    assert await accel.async_read_state() is AccelState.ACTIVE


async def test_pcie_autosuspend_delay_is_honoured(kernel: FakePciKernel) -> None:
    await asyncio.to_thread((kernel.device / "power" / "autosuspend_delay_ms").write_text, "400\n")
    accel = pcie(kernel, settle_timeout_ms=150)
    with pytest.raises(DriverError, match="not suspended"):  # the delay is longer than we wait
        await accel.async_set_state(AccelState.SLEEP)
    await wait_until(lambda: kernel.status == "suspended", what="suspended after the autosuspend delay")
    await asyncio.to_thread((kernel.device / "power" / "autosuspend_delay_ms").write_text, "-1\n")
    await accel.async_set_state(AccelState.ACTIVE)
    never = pcie(kernel, settle_timeout_ms=150)
    with pytest.raises(DriverError, match="not suspended"):  # a negative delay forbids it, like "on"
        await never.async_set_state(AccelState.SLEEP)


async def test_pcie_off_by_remove_and_back_by_rescan(kernel: FakePciKernel) -> None:
    accel = pcie(kernel, allow_remove=True)
    await accel.async_set_state(AccelState.OFF)
    assert not await asyncio.to_thread(kernel.device.exists)
    assert await accel.async_read_state() is AccelState.OFF
    await accel.async_set_state(AccelState.OFF)  # idempotent
    assert accel.counters["removes"] == 1
    await accel.async_set_state(AccelState.SLEEP)  # rescan (control "on" again), then suspend
    assert accel.counters["rescans"] == 1
    assert await accel.async_read_state() is AccelState.SLEEP


async def test_pcie_unknown_status_and_missing_device(tmp_path: Path) -> None:
    root = tmp_path / "devices"
    (root / ADDR / "power").mkdir(parents=True)
    (root / ADDR / "power" / "control").write_text("on\n")
    (root / ADDR / "power" / "runtime_status").write_text("error\n")
    accel = PcieRuntimePmAccelerator(PcieRuntimePmOptions(address=ADDR, root=root))
    assert await accel.async_read_state() is AccelState.UNKNOWN
    missing = PcieRuntimePmAccelerator(PcieRuntimePmOptions(address="0000:02:00.0", root=root))
    with pytest.raises(DriverError, match="not found"):
        await missing.async_open()
    assert await missing.async_read_state() is AccelState.OFF


# -- external commands ---------------------------------------------------------------------------


@pytest.fixture
def tool(tmp_path: Path) -> tuple[list[str], Path]:
    """A small 'vendor tool': `tool set STATE DEVICE` records the state; `tool get` prints it;
    `tool fail` exits 3 with a message; `tool hang` never returns."""
    state = tmp_path / "state"
    state.write_text("off")
    script = tmp_path / "tool.py"
    script.write_text(
        "import sys, time, pathlib\n"
        f"state = pathlib.Path({str(state)!r})\n"
        "cmd = sys.argv[1]\n"
        "if cmd == 'set':\n"
        "    state.write_text(sys.argv[2] + ' ' + sys.argv[3])\n"
        "elif cmd == 'get':\n"
        "    print(state.read_text())\n"
        "elif cmd == 'fail':\n"
        "    print('firmware not responding', file=sys.stderr); sys.exit(3)\n"
        "elif cmd == 'hang':\n"
        "    time.sleep(60)\n"
    )
    return [sys.executable, str(script)], state


async def test_command_driver_runs_argv_and_reads_back(tool: tuple[list[str], Path]) -> None:
    base, state = tool
    accel = CommandAccelerator({
        "commands": {s: [*base, "set", "{state}", "{device}"] for s in ("off", "sleep", "active")},
        "status": [*base, "get"],
        "device": "npu0",
    })
    await accel.async_open()
    await accel.async_set_state(AccelState.ACTIVE)
    assert state.read_text() == "active npu0"
    assert await accel.async_read_state() is AccelState.ACTIVE
    await accel.async_set_state(AccelState.SLEEP)
    assert await accel.async_read_state() is AccelState.SLEEP
    with pytest.raises(DriverError, match="no command configured for state 'idle'"):
        await accel.async_set_state(AccelState.IDLE)


async def test_command_failure_carries_stderr_tail(tool: tuple[list[str], Path]) -> None:
    base, _ = tool
    accel = CommandAccelerator({"commands": {"active": [*base, "fail"]}})
    with pytest.raises(DriverError, match="status 3: firmware not responding"):
        await accel.async_set_state(AccelState.ACTIVE)
    assert accel.counters["failures"] == 1
    assert await accel.async_read_state() is AccelState.UNKNOWN  # no status command


async def test_command_timeout_kills(tool: tuple[list[str], Path]) -> None:
    base, _ = tool
    accel = CommandAccelerator({"commands": {"active": [*base, "hang"]}, "timeout_ms": 300})
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(DriverError, match="timed out"):
        await accel.async_set_state(AccelState.ACTIVE)
    assert loop.time() - start < 10
    assert accel.counters["timeouts"] == 1


async def test_command_status_words_and_garbage(tool: tuple[list[str], Path]) -> None:
    base, state = tool
    accel = CommandAccelerator({"commands": {"off": ["true"]}, "status": [*base, "get"],
                                "status_words": {"D3cold": "off", "D0": "active"}})
    state.write_text("D0 (link up)")
    assert await accel.async_read_state() is AccelState.ACTIVE
    state.write_text("d3cold")
    assert await accel.async_read_state() is AccelState.OFF
    state.write_text("\x00\xffgarbage")
    assert await accel.async_read_state() is AccelState.UNKNOWN
    assert accel.counters["unparsed_status"] == 1


async def test_command_missing_program_is_driver_error(tmp_path: Path) -> None:
    accel = CommandAccelerator({"commands": {"active": [str(tmp_path / "nope"), "{state}"]}})
    with pytest.raises(DriverError, match="cannot run"):
        await accel.async_set_state(AccelState.ACTIVE)
    with pytest.raises(DriverError, match="placeholder"):
        await CommandAccelerator({"commands": {"off": ["echo", "{nope}"]}}).async_set_state(
            AccelState.OFF)


# -- companion MCU -------------------------------------------------------------------------------


@pytest.fixture
async def mcu() -> AsyncIterator[tuple[McuEmulator, McuLink]]:
    emu = McuEmulator(heartbeat_interval_s=0.05, readings_interval_s=0.1)
    await emu.async_open()
    emu.start()
    link = McuLink(McuLinkOptions(port=emu.path, heartbeat_timeout_ms=400,
                                  reconnect_initial_ms=50))
    await link.async_start()
    await link.wait_connected(5)
    yield emu, link
    await link.async_close()
    await emu.stop()


async def test_mcu_accelerator_switches_rail_and_reads_back(
    mcu: tuple[McuEmulator, McuLink],
) -> None:
    emu, link = mcu
    accel = McuAccelerator({}, link=link)
    sensor = McuPowerSensor({}, link=link)
    await accel.async_open()
    await wait_until(lambda: link.last_readings is not None)
    assert await accel.async_read_state() is AccelState.OFF
    await accel.async_set_state(AccelState.ACTIVE)
    assert emu.rail_on
    assert await accel.async_read_state() is AccelState.ACTIVE
    reading = await sensor.async_read()
    assert reading is not None and reading.measured and reading.watts == pytest.approx(6.0)
    await accel.async_set_state(AccelState.SLEEP)
    assert await accel.async_read_state() is AccelState.SLEEP
    reading = await sensor.async_read()
    assert reading is not None and reading.watts == 0.0
    await accel.async_close()


async def test_mcu_accelerator_stuck_rail_and_silence(mcu: tuple[McuEmulator, McuLink]) -> None:
    emu, link = mcu
    accel = McuAccelerator({"confirm_timeout_ms": 300, "readings_max_age_ms": 300}, link=link)
    sensor = McuPowerSensor({"readings_max_age_ms": 300}, link=link)
    emu.misbehave.rail_stuck = True
    with pytest.raises(DriverError, match="no READINGS showed it"):
        await accel.async_set_state(AccelState.ACTIVE)
    assert accel.counters["confirm_timeouts"] == 1
    assert await accel.async_read_state() is AccelState.OFF  # what the MCU measures
    emu.misbehave.silent = True
    await wait_until(lambda: link.stale, timeout=3)
    # Readings age out: the state becomes unknown and the sensor gives nothing.
    await asyncio.wait_for(_until_unknown(accel), 3)
    assert await sensor.async_read() is None
    assert sensor.counters["stale"] >= 1


async def _until_unknown(accel: McuAccelerator) -> None:
    while await accel.async_read_state() is not AccelState.UNKNOWN:
        await asyncio.sleep(0.01)


async def test_mcu_accelerator_owns_its_link_from_options(tmp_path: Path) -> None:
    emu = McuEmulator(heartbeat_interval_s=0.05, readings_interval_s=0.1)
    await emu.async_open()
    emu.start()
    accel = McuAccelerator({"link": {"port": emu.path}})
    try:
        await accel.async_open()
        await accel.link.wait_connected(5)
        await accel.async_set_state(AccelState.IDLE)
        assert await accel.async_read_state() is AccelState.IDLE
    finally:
        await accel.async_close()
        await emu.stop()
    with pytest.raises(ValueError, match="link"):
        McuAccelerator({})


# -- recovery rungs (RecoverableAccelerator) ---------------------------------------------------


async def test_gpio_rail_cycle_goes_down_waits_and_comes_back() -> None:
    fake = FakeLineRequest(17, 27, pg_lag_reads=1)
    accel = GpioAccelerator(GpioOptions(enable_line=17, power_good_line=27, rail_off_ms=30, poll_interval_ms=1),
                            opener=lambda o: fake)
    assert isinstance(accel, RecoverableAccelerator)
    assert accel.recovery_actions() == {"rail_cycle"}
    await accel.async_open()
    await accel.async_set_state(AccelState.IDLE)
    assert await accel.async_read_state() is AccelState.IDLE
    fake.writes.clear()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await accel.async_recover("rail_cycle")
    assert loop.time() - started >= 0.03  # the rail stayed down for rail_off_ms
    assert fake.writes == [(17, Value.INACTIVE), (17, Value.ACTIVE)]
    assert fake.values[27] is Value.ACTIVE  # power-good followed before it returned
    assert await accel.async_read_state() is AccelState.ACTIVE  # the watchdog wanted a wake
    assert accel.counters["rail_cycles"] == 1
    with pytest.raises(DriverError, match="rebind"):
        await accel.async_recover("rebind")
    # A rail whose power-good never comes back is a failed step, not a hang.
    fake.pg_broken = True
    fake.values[27] = Value.INACTIVE
    broken = GpioAccelerator(GpioOptions(enable_line=17, power_good_line=27, rail_off_ms=1,
                                         power_good_timeout_ms=50, poll_interval_ms=1), opener=lambda o: fake)
    await broken.async_open()
    with pytest.raises(DriverError, match="power-good"):
        await broken.async_recover("rail_cycle")
    assert broken.counters["rail_cycles"] == 0


def read(path: Path) -> str:
    return path.read_text().strip()


async def sysfs(path: Path) -> str:
    """A sysfs file's value, read off the event loop."""
    return await asyncio.to_thread(read, path)


async def test_pcie_rebind_unbinds_and_binds_the_same_driver(kernel: FakePciKernel) -> None:
    accel = pcie(kernel)
    assert isinstance(accel, RecoverableAccelerator)
    assert accel.recovery_actions() == {"rebind", "pci_rescan"}
    await accel.async_set_state(AccelState.SLEEP)
    await accel.async_recover("rebind")
    assert [e for e in kernel.events if e in ("bind", "unbind")] == ["unbind", "bind"]
    assert await asyncio.to_thread(os.readlink, kernel.device / "driver") == str(kernel.driver_dir)
    assert accel.counters["rebinds"] == 1
    # It ends awake: power/control back to "on", and the device resumes.
    assert await sysfs(kernel.device / "power" / "control") == "on"
    await wait_until(lambda: read(kernel.device / "power" / "runtime_status") == "active")
    assert await accel.async_read_state() is AccelState.ACTIVE
    # Nothing bound and no driver_name: there is nothing to bind.
    await asyncio.to_thread((kernel.driver_dir / "unbind").write_text, ADDR)
    await wait_until(lambda: not kernel.bound, what="unbound")
    with pytest.raises(DriverError, match="driver_name"):
        await accel.async_recover("rebind")
    named = pcie(kernel, driver_name="npu")
    await named.async_recover("rebind")
    assert kernel.events[-1] == "bind" or "bind" in kernel.events[-3:]
    assert await asyncio.to_thread((kernel.device / "driver").is_symlink)
    with pytest.raises(DriverError, match="rail_cycle"):
        await named.async_recover("rail_cycle")


async def test_pcie_rescan_removes_and_brings_the_device_back_awake(kernel: FakePciKernel) -> None:
    # No allow_remove: `off` stays refused, but the watchdog's rescan is still possible.
    accel = pcie(kernel)
    await accel.async_set_state(AccelState.SLEEP)
    await accel.async_recover("pci_rescan")
    assert (accel.counters["removes"], accel.counters["rescans"]) == (1, 1)
    assert await asyncio.to_thread(kernel.device.is_dir)
    assert await sysfs(kernel.device / "power" / "control") == "on"
    await wait_until(lambda: read(kernel.device / "power" / "runtime_status") == "active")
    assert await accel.async_read_state() is AccelState.ACTIVE
    with pytest.raises(DriverError, match="allow_remove"):
        await accel.async_set_state(AccelState.OFF)
