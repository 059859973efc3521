"""Reload as a transaction (docs/reload.md): one test per config section proves that a changed
value takes effect live, or that the reload is refused whole with the keys that need a restart;
after every reload a stop still leaves the accelerator in the safe state. Then the bad input:
a file that fails validation, a swap that fails halfway, and two reloads at once.

The daemon runs in-process on a python-can virtual bus with the demo's DBC (the "vehicle" of
tests/test_faults.py sends every message at 50 Hz); the config is a real file, reloaded from
disk as SIGHUP does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import Config, load_config, parse_config
from cerebellumd.config.reload import LIVE_KEYS, LIVE_SECTIONS, plan_reload
from cerebellumd.daemon.clock import Clock
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.daemon.sources import SomeIpSource
from cerebellumd.drivers.accel_simulated import SimulatedAccelerator
from cerebellumd.drivers.someip import build_notification
from cerebellumd.profiles import load_profile
from tests.test_faults import DEMO_TEXT, Rig, _channels

from .helpers import free_port, until


def base_text(channel: str) -> str:
    text = DEMO_TEXT.replace('channel = "cerebellumd-demo"', f'channel = "{channel}"')
    text = replace(text, "min_dwell_ms = 300", "min_dwell_ms = 0")
    text = replace(text, "\nrelease_ms = 1000", "\nrelease_ms = 0")
    return replace(text, "[prometheus]\n", "[prometheus]\nenabled = false\n")


@dataclass
class Reloadable:
    rig: Rig
    path: Path
    text: str

    @property
    def daemon(self) -> Daemon:
        return self.rig.daemon

    async def write(self, text: str) -> None:
        self.text = text
        await asyncio.to_thread(self.path.write_text, text)

    def reloads(self, result: str) -> float:
        return self.rig.metric("cerebellumd_config_reloads_total", result=result)


async def make(tmp_path: Path, extra: str = "") -> Reloadable:
    channel = f"test-reload-{next(_channels)}"
    text = base_text(channel) + extra
    path = tmp_path / "cerebellumd.toml"
    await asyncio.to_thread(path.write_text, text)
    config = await asyncio.to_thread(load_config, path)
    model = await asyncio.to_thread(load_profile, "orin_nano")
    driver = SimulatedAccelerator(model, initial=AccelState.SLEEP, time_scale=50.0)
    daemon = await Daemon.async_create(config, clock=Clock(), driver=driver, model=model, config_path=str(path))
    rig = Rig(daemon, driver, channel)
    rig.start_vehicle()
    await daemon.async_start()
    return Reloadable(rig, path, text)


async def close_and_check_safe_state(r: Reloadable) -> None:
    """SIGTERM's path: every stop step, the safe state last."""
    await r.rig.close()
    safe = AccelState(r.daemon.config.daemon.safe_state)
    assert r.daemon.assembly.safe_state_reached is True
    assert r.daemon.assembly.stop_errors == []
    assert r.rig.driver.commands[-1] is safe  # the driver's own record: the last command it got


@pytest.fixture
async def reloadable(tmp_path: Path) -> AsyncIterator[Reloadable]:
    r = await make(tmp_path)
    try:
        yield r
    finally:
        if r.daemon.assembly.safe_state_reached is None:
            await r.rig.close()


def replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# -- the plan: every section of the config is classified ---------------------------------------

#: One change per top-level section, and whether it applies live.
CHANGES: dict[str, tuple[Callable[[str], str], bool]] = {
    "daemon": (lambda t: replace(t, "tick_ms = 10", "tick_ms = 20"), True),
    "realtime": (lambda t: t + "\n[realtime]\nmlockall = true\n", False),
    "accelerator": (lambda t: replace(t, "[accelerator]\n", "[accelerator]\nretries = 5\n"), True),
    "can": (lambda t: replace(t, "silence_timeout_ms = 1000", "silence_timeout_ms = 2500"), False),
    "signals": (lambda t: t + '\n[signals.ambient_c]\ncan = "BodyStatus.AmbientTemp"\nmax_age_ms = 500\n', True),
    "demands": (lambda t: replace(t, 'when = "urban_request == 1"', 'when = "traffic_density > 5"'), True),
    "policy": (lambda t: replace(t, "\nrelease_ms = 0", "\nrelease_ms = 1500"), True),
    "guards": (lambda t: replace(t, "battery_min_v = 11.6", "battery_min_v = 20.0"), True),
    "power": (lambda t: t + '\n[[power.domains]]\nname = "radio"\nsource = "constant"\nwatts = 2.0\n', True),
    "prometheus": (lambda t: replace(t, "port = 9108", "port = 9109"), False),
    "mqtt": (lambda t: t + "\n[mqtt]\ncommand_rate_per_minute = 1\n", True),
    "nm": (lambda t: t + "\n[nm]\nenabled = true\n", False),
    "leases": (lambda t: t + "\n[leases]\nmax_clients = 3\n", False),
    "someip": (lambda t: t + '\n[[someip]]\nname = "adas"\nhost = "127.0.0.1"\nport = 0\n', True),
    "mcu": (lambda t: t + '\n[mcu]\nport = "/dev/null"\n', False),
    "vehicle_power": (lambda t: t + '\n[vehicle_power]\nenabled = true\ncan_ignition_signal = "battery_v"\n', False),
    "battery": (lambda t: t + "\n[battery]\ncapacity_wh = 40\n", False),
}


def test_every_section_of_the_config_is_classified() -> None:
    """A section added to the config without a reload rule fails here."""
    assert set(CHANGES) == set(Config.model_fields)
    assert LIVE_SECTIONS | set(LIVE_KEYS) <= set(Config.model_fields)


@pytest.mark.parametrize("section", sorted(CHANGES))
def test_plan_names_the_changed_section_and_whether_it_restarts(section: str) -> None:
    base = base_text("plan")
    change, live = CHANGES[section]
    old, new = parse_config(base), parse_config(change(base))
    plan = plan_reload(old, new)
    assert plan.sections == {section}, plan
    assert plan.refused is (not live)
    if not live:
        assert all(k.split(".")[0] == section for k in plan.restart)
        assert section in plan.message() and "restart" in plan.message()


def test_a_live_section_with_a_restart_key_refuses_the_whole_file() -> None:
    base = base_text("plan")
    new = replace(base, "tick_ms = 10", "tick_ms = 20")
    new = replace(new, 'node = "', 'node = "other-')
    plan = plan_reload(parse_config(base), parse_config(new))
    assert plan.restart == ("daemon.node",) and "daemon.tick_ms" in plan.changed


# -- each section against a running daemon -------------------------------------------------------


async def effect_daemon(r: Reloadable) -> None:
    assert r.daemon.tick_period_s == pytest.approx(0.020)
    ticks = r.daemon.decisions
    await until(lambda: r.daemon.decisions > ticks + 20, 5, "decisions on the new period")


async def effect_accelerator(r: Reloadable) -> None:
    assert r.daemon.actuator.config.retries == 5


async def effect_signals(r: Reloadable) -> None:
    await until(lambda: "ambient_c" in r.daemon.samples, 5, "the new signal decoded from its frame")
    assert r.daemon.samples["ambient_c"].value == pytest.approx(20)


async def effect_demands(r: Reloadable) -> None:
    # The vehicle sends traffic density 10 and no urban request: only the new expression holds.
    await until(lambda: r.rig.metric("cerebellumd_wakes_total", reason="demand:urban_perception") >= 1, 10,
                "a wake by the changed demand")


async def effect_policy(r: Reloadable) -> None:
    assert r.daemon.params.release_s == pytest.approx(1.5)


async def effect_guards(r: Reloadable) -> None:
    r.rig.values["AdasStatus"]["HighwayAssistEngaged"] = 1  # a normal demand; the battery is 13.8 V < 20 V
    await until(lambda: r.rig.metric("cerebellumd_denied_wakes_total", reason="guard:battery") >= 1, 10,
                "the normal wake denied by the new battery threshold")
    assert r.daemon.actuator.state is not AccelState.ACTIVE


async def effect_power(r: Reloadable) -> None:
    before = dict(r.daemon.joules)
    assert before["radio"] == 0.0  # a new domain starts at zero
    await until(lambda: r.daemon.joules["radio"] > 0.05, 5, "the new domain accrues energy")
    for domain, joules in before.items():
        assert r.daemon.joules[domain] >= joules  # totals kept, not restarted
    assert r.rig.metric("cerebellumd_domain_energy_joules_total", domain="radio") > 0


async def effect_mqtt(r: Reloadable) -> None:
    commands = r.daemon.commands
    now = r.daemon.clock.now()
    first = commands.handle_payload('{"command": "wake", "owner": "op", "id": "a"}', now)
    second = commands.handle_payload('{"command": "wake", "owner": "op", "id": "b"}', now)
    assert first.ok and not second.ok and "rate" in (second.error or "")


async def effect_someip(r: Reloadable) -> None:
    sources = [p for p in r.daemon.parts if isinstance(p, SomeIpSource)]
    assert [s.name for s in sources] == ["adas"]
    assert sources[0].receiver.local_address[1] > 0


EFFECTS: dict[str, Callable[[Reloadable], Awaitable[None]]] = {
    "daemon": effect_daemon, "accelerator": effect_accelerator, "signals": effect_signals,
    "demands": effect_demands, "policy": effect_policy, "guards": effect_guards, "power": effect_power,
    "mqtt": effect_mqtt, "someip": effect_someip,
}


def test_every_live_section_has_an_effect_test() -> None:
    assert set(EFFECTS) == {s for s, (_, live) in CHANGES.items() if live}


@pytest.mark.parametrize("section", sorted(CHANGES))
async def test_reload_applies_or_refuses_each_section_and_stop_is_still_safe(
        reloadable: Reloadable, section: str) -> None:
    r = reloadable
    change, live = CHANGES[section]
    old_config = r.daemon.config
    await until(lambda: "speed_kmh" in r.daemon.samples, 5, "traffic decoded")
    await r.write(change(r.text))
    result = await r.daemon.reload()
    if live:
        assert result.result == "ok", result.message
        assert r.daemon.config is not old_config
        assert r.reloads("ok") == 1
        await EFFECTS[section](r)
    else:
        assert result.result == "restart_required", result.message
        assert section in result.message
        assert r.daemon.config is old_config  # nothing of the file applied
        assert r.reloads("restart_required") == 1 and r.reloads("ok") == 0
    await close_and_check_safe_state(r)


# -- bad input -----------------------------------------------------------------------------------


async def test_a_file_that_fails_validation_changes_nothing(reloadable: Reloadable) -> None:
    r = reloadable
    old = r.daemon.config
    await r.write(r.text + "\n[policy]\nrelease_msec = 10\n")  # a typo (and a duplicate table)
    result = await r.daemon.reload()
    assert result.result == "error" and "keeping the running configuration" in result.message
    assert r.daemon.config is old and r.reloads("error") == 1
    await close_and_check_safe_state(r)


async def test_a_signal_missing_from_the_running_dbc_is_refused(reloadable: Reloadable) -> None:
    """As `run` refuses to start with it: a typo in a CAN signal never becomes a signal that is
    never fed (and, with on_stale = wake, a wake that never ends)."""
    r = reloadable
    old = r.daemon.config
    await r.write(r.text + '\n[signals.ambient_c]\ncan = "BodyStatus.AmbientTmp"\n')
    result = await r.daemon.reload()
    assert result.result == "error", result.message
    assert "AmbientTmp" in result.message and "AmbientTemp" in result.message  # did you mean
    assert r.daemon.config is old
    await close_and_check_safe_state(r)


SOMEIP_ON = """
[[someip]]
name = "adas"
host = "127.0.0.1"
port = {port}
[[someip.fields]]
notification = "adas"
service_id = 0x1234
event_id = 0x8001
field = "obstacle_m"
offset = 0
type = "u16"
scale = 0.01

[signals.obstacle]
someip = "adas.obstacle_m"
max_age_ms = 5000
"""


async def test_a_swap_that_fails_halfway_restores_the_old_parts(tmp_path: Path) -> None:
    old_port = free_port(socket.SOCK_DGRAM)
    r = await make(tmp_path, SOMEIP_ON.format(port=old_port))
    try:
        old_config = r.daemon.config
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))  # the new endpoint's port is in use: its start fails
            busy_port = taken.getsockname()[1]
            await r.write(r.text.replace(f"port = {old_port}", f"port = {busy_port}").replace(
                "\nrelease_ms = 0", "\nrelease_ms = 700"))
            result = await r.daemon.reload()
        assert result.result == "error" and "restored" in result.message, result.message
        assert r.reloads("error") == 1
        assert r.daemon.config is old_config and r.daemon.params.release_s == 0  # no half of the new file
        # The old endpoint is back on its port and feeds its signal again.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(build_notification(0x1234, 0x8001, (550).to_bytes(2, "big")), ("127.0.0.1", old_port))
            await until(lambda: "obstacle" in r.daemon.samples, 5, "a sample through the restored endpoint")
        assert r.daemon.samples["obstacle"].value == pytest.approx(5.5)
        await close_and_check_safe_state(r)
    finally:
        if r.daemon.assembly.safe_state_reached is None:
            await r.rig.close()


async def test_two_reloads_at_once_are_serialized(reloadable: Reloadable, monkeypatch: pytest.MonkeyPatch) -> None:
    r = reloadable
    assembly = r.daemon.assembly
    swap = assembly._async_swap
    running = 0
    overlap = 0

    async def observed(*args: object) -> None:
        nonlocal running, overlap
        running += 1
        overlap = max(overlap, running)
        try:
            await asyncio.sleep(0)  # yield: a second reload would enter here if not serialized
            await swap(*args)  # type: ignore[arg-type]
        finally:
            running -= 1

    monkeypatch.setattr(assembly, "_async_swap", observed)
    await r.write(CHANGES["power"][0](r.text))
    first, second = await asyncio.gather(r.daemon.reload(), r.daemon.reload())
    assert overlap == 1
    assert first.result == "ok" and first.plan is not None and first.plan.sections == {"power"}
    assert second.result == "ok" and second.plan is not None and not second.plan.changed  # already applied
    assert r.reloads("ok") == 2
    await close_and_check_safe_state(r)


# -- the safe state is the last stop step and runs whatever failed before it --------------------


async def test_safe_state_is_reached_when_every_other_stop_step_fails(tmp_path: Path) -> None:
    r = await make(tmp_path, SOMEIP_ON.format(port=0) + "\n[leases]\nenabled = true\npath = \"{}\"\n".format(
        tmp_path / "leases.sock"))
    daemon = r.daemon
    failing: list[str] = []
    for part in daemon.parts:
        def fail(name: str = type(part).__name__) -> Awaitable[None]:
            failing.append(name)
            raise RuntimeError(f"{name} will not stop")

        part.async_stop = fail  # type: ignore[attr-defined]

    def finish_fails() -> None:
        raise RuntimeError("final accounting failed")

    async def metrics_fail() -> None:
        raise RuntimeError("metrics endpoint will not stop")

    daemon.finish = finish_fails  # type: ignore[method-assign]
    daemon.metrics.async_stop = metrics_fail  # type: ignore[method-assign]
    await until(lambda: daemon.decisions > 5, 5, "the daemon running")
    await r.rig.close()  # must not raise
    assert {"FileCheck", "LeaseService", "CanIngest", "SomeIpSource", "Lifecycle"} <= set(failing)
    errors = [name for name, _ in daemon.assembly.stop_errors]
    assert len(errors) >= len(failing)
    assert daemon.assembly.safe_state_reached is True
    assert r.rig.driver.commands[-1] is AccelState(daemon.config.daemon.safe_state)
