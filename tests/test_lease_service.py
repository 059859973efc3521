"""Leases wired into the daemon: real Unix-socket clients, an in-process daemon with the
simulated accelerator; operator commands through the CommandProcessor MQTT uses."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import Config, parse_config
from cerebellumd.daemon.lease_service import LeaseService
from cerebellumd.daemon.runtime import Daemon

from .helpers import until


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cbl-", dir="/tmp"))  # Unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def daemon(sock_dir: Path) -> AsyncIterator[Daemon]:
    text = (
        '[daemon]\nnode = "t"\ntick_ms = 10\ntelemetry_interval_ms = 50\ninitial_state = "sleep"\n'
        "[prometheus]\nenabled = false\n"
        '[accelerator]\nprofile = "orin_nano"\n'
        "[policy]\nmin_dwell_ms = 0\nrelease_ms = 0\n"
        f'[leases]\nenabled = true\npath = "{sock_dir / "l.sock"}"\noverride_grace_s = 30\n'
    )
    config: Config = await asyncio.to_thread(parse_config, text)
    d = await Daemon.async_create(config)
    await d.async_start()
    yield d
    await d.async_stop()


class App:
    """An inference application talking NDJSON over the lease socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> App:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def ask(self, **request: Any) -> dict[str, Any]:
        self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()
        reply: dict[str, Any] = json.loads(await self.reader.readline())
        return reply

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def holds_gauge(daemon: Daemon) -> float:
    return daemon.metrics.registry.get_sample_value("cerebellumd_holds_active") or 0.0


def operator(daemon: Daemon, command: str, cid: str) -> None:
    payload = {"command": command, "owner": "op", "id": cid, "ttl_s": 600}
    assert daemon.commands.handle_payload(json.dumps(payload), daemon.clock.now()).ok


async def test_an_awake_lease_keeps_the_accelerator_active_and_shows_everywhere(daemon: Daemon) -> None:
    path = daemon.config.leases.path
    app = await App.connect(path)
    reply = await app.ask(op="acquire", max_duration_s=600, app="lane_assist", reason="highway", ttl_s=60)
    assert reply["ok"]
    await until(lambda: daemon.actuator.state is AccelState.ACTIVE)
    snap = daemon.snapshot()
    assert snap.reason == "hold:app:lane_assist"
    assert [h.owner for h in snap.holds] == ["app:lane_assist"]
    await until(lambda: holds_gauge(daemon) == 1)
    service = next(s for s in daemon.parts if isinstance(s, LeaseService))
    assert service.state_extra()["leases"]["leases"][0]["app"] == "lane_assist"
    # the app goes away without releasing: its lease goes with its connection
    await app.close()
    await until(lambda: daemon.actuator.goal is not AccelState.ACTIVE)
    await until(lambda: holds_gauge(daemon) == 0)


async def test_operator_override_defers_normal_leases_but_not_safety_ones(daemon: Daemon) -> None:
    path = daemon.config.leases.path
    normal = await App.connect(path)
    assert (await normal.ask(op="acquire", max_duration_s=600, app="infotainment", ttl_s=60))["ok"]
    await until(lambda: daemon.actuator.goal is AccelState.ACTIVE)
    operator(daemon, "sleep", "s1")  # the operator wants it resting: the normal lease waits
    await until(lambda: daemon.actuator.goal is not AccelState.ACTIVE)
    assert (await normal.ask(op="status"))["override_grace_s"] > 0
    safety = await App.connect(path)
    assert (await safety.ask(op="acquire", max_duration_s=600, app="pedestrian", priority="safety", ttl_s=60))["ok"]
    await until(lambda: daemon.actuator.goal is AccelState.ACTIVE)
    assert daemon.snapshot().reason == "hold:app:pedestrian"
    overrides = daemon.metrics.registry.get_sample_value("cerebellumd_lease_overrides_total")
    assert overrides == 1
    await safety.close()
    await normal.close()


def remote(daemon: Daemon, command: str, cid: str, priority: str, owner: str = "fleet_tool") -> None:
    """A remote tool's command with a lease priority, through the processor MQTT uses."""
    payload = {"command": command, "owner": owner, "id": cid, "ttl_s": 600, "priority": priority}
    assert daemon.commands.handle_payload(json.dumps(payload), daemon.clock.now()).ok


async def test_a_remote_tools_hold_takes_part_in_the_lease_priority_rule(daemon: Daemon) -> None:
    path = daemon.config.leases.path
    app = await App.connect(path)
    assert (await app.ask(op="acquire", max_duration_s=600, app="infotainment", ttl_s=60, priority="normal"))["ok"]
    await until(lambda: daemon.actuator.goal is AccelState.ACTIVE)
    # power_saver sleep < normal awake lease: the lease keeps it awake.
    remote(daemon, "sleep", "p1", "power_saver")
    await until(lambda: daemon.decisions > 0 and daemon.snapshot().reason == "hold:app:infotainment")
    assert daemon.actuator.goal is AccelState.ACTIVE
    # normal sleep ties the normal awake lease: awake wins the tie (fail-safe), whatever the
    # order of the hold sources.
    remote(daemon, "sleep", "p2", "normal")
    before = daemon.decisions
    await until(lambda: daemon.decisions > before + 5)
    assert daemon.actuator.goal is AccelState.ACTIVE
    assert daemon.snapshot().reason == "hold:app:infotainment"
    # safety sleep beats the normal lease: the accelerator rests.
    remote(daemon, "sleep", "p3", "safety")
    await until(lambda: daemon.actuator.goal is not AccelState.ACTIVE)
    assert any(h.owner == "fleet_tool" and h.priority == 300 for h in daemon.snapshot().holds)
    # A lease-ranked hold is an app, not a manual override: no grace, no override counted.
    assert (await app.ask(op="status")).get("override_grace_s", 0) == 0
    assert (daemon.metrics.registry.get_sample_value("cerebellumd_lease_overrides_total") or 0) == 0
    # Releasing the remote holds hands the decision back to the lease.
    assert daemon.commands.handle_payload(
        json.dumps({"command": "release", "owner": "fleet_tool", "id": "r1"}), daemon.clock.now()).ok
    await until(lambda: daemon.actuator.goal is AccelState.ACTIVE)
    await app.close()


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_an_energy_capped_lease_ends_on_the_accelerators_measured_energy(daemon: Daemon) -> None:
    app = await App.connect(daemon.config.leases.path)
    # 0.01 Wh = 36 J: a couple of seconds at the orin_nano's 15 W (its wake counted too).
    reply = await app.ask(op="acquire", app="calibration", ttl_s=60, max_duration_s=600, max_energy_wh=0.01)
    joules_at_grant = daemon.joules["accelerator"]
    assert reply["ok"] and reply["max_energy_wh"] == 0.01
    await until(lambda: daemon.actuator.goal is AccelState.ACTIVE)
    async with asyncio.timeout(30):
        event: dict[str, Any] = json.loads(await app.reader.readline())  # the daemon's tick ends it
    assert (event["event"], event["id"], event["reason"]) == ("ended", reply["id"], "energy_cap")
    used = daemon.joules["accelerator"] - joules_at_grant
    assert 36.0 - 1.0 <= used <= 36.0 + 1.0  # within a 10 ms tick of the cap (15 W x 0.01 s = 0.15 J)
    await until(lambda: sample(daemon, "cerebellumd_lease_ended_total", reason="energy_cap") == 1)
    await until(lambda: daemon.actuator.goal is not AccelState.ACTIVE)
    # Refusals are counted with their kind.
    assert (await app.ask(op="acquire", app="x", ttl_s=60))["error"] == "no_cap"
    await app.close()
    await until(lambda: sample(daemon, "cerebellumd_lease_errors_total", kind="no_cap") == 1)
    assert sample(daemon, "cerebellumd_lease_ended_total", reason="duration_cap") == 0  # exported at zero


async def test_rules_refuse_this_peer_and_the_refusal_is_counted(sock_dir: Path) -> None:
    text = (
        '[daemon]\nnode = "t"\ntick_ms = 10\ntelemetry_interval_ms = 50\n[prometheus]\nenabled = false\n'
        f'[leases]\nenabled = true\npath = "{sock_dir / "r.sock"}"\n'
        '[[leases.rules]]\nuid = 4242\npriorities = ["safety"]\n'
    )
    d = await Daemon.async_create(await asyncio.to_thread(parse_config, text))
    await d.async_start()
    try:
        app = await App.connect(sock_dir / "r.sock")
        reply = await app.ask(op="acquire", app="a", priority="safety", mode="sleep", ttl_s=60)
        assert reply["error"] == "not_permitted" and "no [leases] rule admits uid 0" in reply["detail"]
        await app.close()
        await until(lambda: sample(d, "cerebellumd_lease_errors_total", kind="not_permitted") == 1)
        assert d.snapshot().holds == ()
    finally:
        await d.async_stop()
