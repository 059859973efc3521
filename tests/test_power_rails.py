"""Rail-map power (daemon/power.py) on temp-dir hwmon trees shaped like a Jetson: one INA3221
with VDD_IN (the module input, a total) and two rails inside it. Summed naively they would count
the parts twice; the daemon must attribute each watt once and integrate energy by trapezoid."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import builtin_example, parse_config
from cerebellumd.daemon.clock import Clock
from cerebellumd.daemon.power import RailPower, build_rail_sensor
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.daemon.sources import PowerReaders
from cerebellumd.drivers.accel_simulated import SimulatedAccelerator
from cerebellumd.profiles import load_profile
from tests.test_faults import until
from tests.test_persist import sample

DEMO_TEXT = builtin_example()
# (mV, mA) per INA3221 channel: 10 W in, 4 W + 3 W inside it; a naive sum would say 17 W.
RAILS = {1: ("VDD_IN", 5000, 2000), 2: ("VDD_CPU_GPU_CV", 5000, 800), 3: ("VDD_SOC", 5000, 600)}


def write_tree(root: Path, values: dict[int, tuple[str, int, int]]) -> None:
    device = root / "hwmon3"
    device.mkdir(parents=True, exist_ok=True)
    (device / "name").write_text("ina3221\n")
    for n, (label, mv, ma) in values.items():
        (device / f"in{n}_label").write_text(label + "\n")
        (device / f"in{n}_input").write_text(f"{mv}\n")
        (device / f"curr{n}_input").write_text(f"{ma}\n")


def config_text(root: Path, channel: str) -> str:
    text = DEMO_TEXT.replace('channel = "cerebellumd-demo"', f'channel = "{channel}"')
    old = '[[power.domains]]\nname = "accelerator"\nsource = "model"\n'
    assert old in text
    # The accelerator, the SoC and the rest of the module come from the rail map (Orin Nano).
    text = text.replace(old, '[[power.domains]]\nname = "accelerator"\nsource = "hwmon"\n')
    text += "".join(f'\n[[power.domains]]\nname = "{n}"\nsource = "hwmon"\n' for n in ("soc", "module_other"))
    text += '\n[power]\nrail_interval_ms = 50\n\n[power.rails]\nboard = "jetson_orin_nano"\n'
    for label, _, _ in RAILS.values():
        text += (f'\n[power.rail_sensors.{label}]\ndriver = "hwmon"\n'
                 f'options = {{ root = "{root}", name = "ina3221", label = "{label}" }}\n')
    return text


async def make_daemon(tmp_path: Path) -> Daemon:
    root = tmp_path / "hwmon"
    await asyncio.to_thread(write_tree, root, RAILS)
    text = config_text(root, f"test-rails-{tmp_path.name}")
    config = await asyncio.to_thread(parse_config, text)
    config = config.model_copy(update={"prometheus": config.prometheus.model_copy(update={"enabled": False})})
    model = await asyncio.to_thread(load_profile, "orin_nano")
    driver = SimulatedAccelerator(model, initial=AccelState.SLEEP, time_scale=50.0)
    return await Daemon.async_create(config, clock=Clock(), driver=driver, model=model)


def rail_service(daemon: Daemon) -> RailPower:
    return next(s for s in daemon.parts if isinstance(s, RailPower))


def rail_part(daemon: Daemon) -> RailPower:
    """The part as the assembly builds it, not started: its readings are the test's own."""
    power = daemon.config.power
    assert power.rails is not None
    rail_map = power.rails.rail_map()
    sensors = {rail: build_rail_sensor(power.rail_sensors[rail], None) for rail in rail_map.rails()}
    return RailPower(rail_map, sensors, power.rail_interval_ms / 1000, metrics=daemon.metrics, energy=daemon)


def integral(history: list[tuple[float, dict[str, float]]], domain: str) -> float:
    """∫ watts dt over the exported readings, trapezoid by trapezoid."""
    total = 0.0
    for (t0, w0), (t1, w1) in itertools.pairwise(history):
        total += 0.5 * (w0[domain] + w1[domain]) * (t1 - t0)
    return total


async def test_rail_map_counts_each_watt_once_and_integrates(tmp_path: Path) -> None:
    daemon = await make_daemon(tmp_path)
    await daemon.async_start()
    try:
        service = rail_service(daemon)
        # The rail-fed domains get no sensor of their own (that would read them twice).
        assert not any(isinstance(s, PowerReaders) for s in daemon.parts)
        assert {"accelerator", "soc", "module_other"} <= daemon.ledger.self_integrated
        await until(lambda: service.reads >= 5, 10, "rail readings")
        watts = service.watts
        assert watts == pytest.approx({"accelerator": 4.0, "soc": 3.0, "module_other": 3.0})
        assert sum(watts.values()) == pytest.approx(10.0)  # VDD_IN, not 17 W
        reg = daemon.metrics.registry
        assert sample(reg, "cerebellumd_rail_power_watts", {"rail": "VDD_IN"}) == pytest.approx(10.0)
        await until(lambda: daemon.watts.get("accelerator") == pytest.approx(4.0), 5, "daemon sees rail watts")

        # A step: the accelerator rail rises to 6 W inside a 12 W input.
        step = dict(RAILS)
        step[1], step[2] = ("VDD_IN", 5000, 2400), ("VDD_CPU_GPU_CV", 5000, 1200)
        await asyncio.to_thread(write_tree, tmp_path / "hwmon", step)
        reads = service.reads
        await until(lambda: service.reads >= reads + 5, 10, "readings after the step")
        assert service.watts == pytest.approx({"accelerator": 6.0, "soc": 3.0, "module_other": 3.0})
    finally:
        await daemon.async_stop()

    history = list(service.history)
    assert len(history) == service.reads  # bounded deque not yet full: all readings kept
    for domain in ("accelerator", "soc", "module_other"):
        expected = integral(history, domain)
        assert service.joules[domain] == pytest.approx(expected, rel=1e-9)
        assert daemon.joules[domain] == pytest.approx(expected, rel=1e-9)  # counted once, not per tick too
        assert sample(daemon.metrics.registry, "cerebellumd_domain_energy_joules_total",
                      {"domain": domain}) == pytest.approx(expected, rel=1e-9)
    # While constant, the trapezoid is exact: soc drew 3 W for the whole span.
    span = history[-1][0] - history[0][0]
    assert service.joules["soc"] == pytest.approx(3.0 * span, rel=1e-9)
    assert service.joules["accelerator"] > 4.0 * span  # the step to 6 W shows
    assert sample(daemon.metrics.registry, "cerebellumd_domain_power_watts",
                  {"domain": "accelerator", "source": "sensor"}) is not None


async def test_overdrawn_group_is_flagged_and_counted(tmp_path: Path) -> None:
    daemon = await make_daemon(tmp_path)
    service = rail_part(daemon)
    # Parts (4 W + 6 W) above the 5 W total: a sensor or map error, flagged; remainder clamped at 0.
    bad = dict(RAILS)
    bad[1], bad[3] = ("VDD_IN", 5000, 1000), ("VDD_SOC", 5000, 1200)
    await asyncio.to_thread(write_tree, tmp_path / "hwmon", bad)
    power = await service.read_once()
    assert power.overdrawn == ("VDD_IN",)
    assert power.watts["module_other"] == 0.0
    assert service.overdrawn["VDD_IN"] == 1
    assert sample(daemon.metrics.registry, "cerebellumd_rail_overdrawn_total", {"rail": "VDD_IN"}) == 1.0


async def test_missing_rail_is_counted_and_not_integrated(tmp_path: Path) -> None:
    daemon = await make_daemon(tmp_path)
    service = rail_part(daemon)
    await service.read_once()
    await asyncio.to_thread((tmp_path / "hwmon" / "hwmon3" / "curr3_input").unlink)
    power = await service.read_once()
    assert "VDD_SOC" in power.missing
    assert service.missing["VDD_SOC"] == 1
    assert "soc" not in power.watts  # unknown, not zero
    assert service.joules["soc"] == 0.0
