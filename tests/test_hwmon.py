"""HwmonSensor against temp-dir trees laid out as /sys/class/hwmon."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cerebellumd.drivers.base import PowerReading, PowerSensor
from cerebellumd.drivers.hwmon import HwmonOptions, HwmonSensor


def make_device(root: Path, index: int, files: dict[str, str]) -> Path:
    device = root / f"hwmon{index}"
    device.mkdir(parents=True)
    for name, content in files.items():
        (device / name).write_text(content + "\n")
    return device


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "hwmon"
    make_device(root, 0, {"name": "cpu_thermal", "temp1_input": "45000"})
    make_device(root, 1, {"name": "ina226", "power1_input": "7250000", "in1_input": "5000",
                          "curr1_input": "1450"})
    make_device(root, 2, {
        "name": "ina3221",
        "in1_label": "VDD_IN", "in1_input": "12000", "curr1_input": "800",
        "in2_label": "VDD_NPU", "in2_input": "5050", "curr2_input": "2000",
        "in3_label": "VDD_SOC", "in3_input": "1000", "curr3_input": "100",
    })
    return root


async def test_ina226_reads_power_input_microwatts(tree: Path) -> None:
    sensor = HwmonSensor({"root": str(tree), "name": "ina226"})
    assert isinstance(sensor, PowerSensor)
    assert await sensor.async_read() == PowerReading(watts=pytest.approx(7.25), measured=True)
    assert sensor.device == tree / "hwmon1"
    assert sensor.counters["reads"] == 1


async def test_ina219_same_layout(tmp_path: Path) -> None:
    make_device(tmp_path, 5, {"name": "ina219", "power1_input": "1500000"})
    reading = await HwmonSensor(HwmonOptions(root=tmp_path, name="ina219")).async_read()
    assert reading is not None and reading.watts == pytest.approx(1.5)


async def test_ina3221_by_label_computes_v_times_i(tree: Path) -> None:
    sensor = HwmonSensor(HwmonOptions(root=tree, name="ina3221", label="VDD_NPU"))
    reading = await sensor.async_read()
    assert reading is not None
    assert reading.watts == pytest.approx(5.05 * 2.0)
    assert reading.measured


async def test_label_alone_finds_the_chip(tree: Path) -> None:
    reading = await HwmonSensor(HwmonOptions(root=tree, label="VDD_SOC")).async_read()
    assert reading is not None and reading.watts == pytest.approx(0.1)


async def test_ina3221_by_channel_number(tree: Path) -> None:
    reading = await HwmonSensor(HwmonOptions(root=tree, name="ina3221", channel=1)).async_read()
    assert reading is not None and reading.watts == pytest.approx(9.6)


async def test_missing_device_is_none_and_counted(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    sensor = HwmonSensor(HwmonOptions(root=tree, name="ina3221", label="VDD_GPU"))
    assert await sensor.async_read() is None
    assert await sensor.async_read() is None
    assert sensor.counters["no_device"] == 2
    # Logged once per failure streak, naming what was looked for.
    warnings = [r for r in caplog.records if "VDD_GPU" in r.getMessage()]
    assert len(warnings) == 1


async def test_garbage_and_vanishing_files_then_recovery(tree: Path) -> None:
    sensor = HwmonSensor(HwmonOptions(root=tree, name="ina226"))
    power = tree / "hwmon1" / "power1_input"
    power.write_text("not a number\n")
    assert await sensor.async_read() is None
    assert sensor.counters["garbage"] == 1
    power.unlink()  # then falls back to V x I, which is present
    reading = await sensor.async_read()
    assert reading is not None and reading.watts == pytest.approx(7.25)
    (tree / "hwmon1" / "curr1_input").unlink()
    assert await sensor.async_read() is None
    assert sensor.counters["missing_file"] == 1
    power.write_text("2000000\n")
    reading = await sensor.async_read()
    assert reading is not None and reading.watts == pytest.approx(2.0)


async def test_renumbered_hwmon_is_found_again(tree: Path) -> None:
    sensor = HwmonSensor(HwmonOptions(root=tree, name="ina226"))
    assert await sensor.async_read() is not None
    (tree / "hwmon1").rename(tree / "hwmon7")
    reading = await sensor.async_read()  # the cached directory is gone: discovery again
    assert reading is not None and sensor.device == tree / "hwmon7"


async def test_missing_root(tmp_path: Path) -> None:
    sensor = HwmonSensor(HwmonOptions(root=tmp_path / "absent", name="ina219"))
    assert await sensor.async_read() is None
    assert sensor.counters["no_device"] == 1


def test_options_need_a_selector_and_a_known_chip() -> None:
    with pytest.raises(ValidationError):
        HwmonOptions()
    with pytest.raises(ValidationError):
        HwmonOptions(name="lm75")
    with pytest.raises(ValidationError):
        HwmonOptions.model_validate({"name": "ina226", "typo": 1})
