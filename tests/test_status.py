"""`cerebellumd status` against a running daemon: from its metrics endpoint and from the
retained MQTT state on a real mosquitto, as JSON, as a table, and when nothing answers."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from cerebellumd.daemon.runtime import Daemon
from cerebellumd.daemon.status import StatusError, status_from_metrics, status_from_mqtt, status_rows

from . import test_mqtt as mq
from .test_mqtt import NODE, PASSWORDS, STATE, Broker, Daemons, Peer, bridge_of, free_port, state_of, until

# the real-broker fixtures of test_mqtt, shared
broker_dir = mq.broker_dir
broker = mq.broker
password_file = mq.password_file
daemons = mq.daemons

DEADLINE_S = 30.0


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cerebellumd", "status", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def held_daemon(broker: Broker, daemons: Daemons) -> Daemon:
    """A daemon held awake by an operator, its hold visible in the metrics and on MQTT."""
    daemon = await daemons.start(broker.port)
    await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
    result = daemon.commands.handle_payload(
        json.dumps({"command": "hold", "owner": "alice", "reason": "status test", "id": "s1"}), daemon.clock.now())
    assert result.ok
    await until(lambda: daemon.snapshot().state.value == "active", "the accelerator to be active")
    # the holds gauge and per-domain energy move with the telemetry tick (1 s)
    await until(lambda: daemon.metrics.registry.get_sample_value("cerebellumd_holds_active") == 1.0
                and daemon.snapshot().joules["gateway"] > 0, "a telemetry tick")
    return daemon


async def test_status_from_the_metrics_endpoint(broker: Broker, daemons: Daemons) -> None:
    daemon = await held_daemon(broker, daemons)
    url = f"http://127.0.0.1:{daemon.port}/metrics"
    code, out, err = await cli("--url", url, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["source"] == "metrics"
    assert status["state"] == "active"
    assert status["holds"] == 1
    assert status["mqtt_connected"] is True
    assert status["can_connected"] == {"vehicle": True}
    assert status["watts"]["gateway"] == 3.5
    assert status["joules"]["gateway"] > 0
    assert status["wakes"] == daemon.snapshot().wakes

    code, out, err = await cli("--url", url)
    assert code == 0, err
    assert "active" in out and "gateway" in out and "connected" in out
    assert "can vehicle" in out


async def test_status_from_mqtt(broker: Broker, daemons: Daemons) -> None:
    await held_daemon(broker, daemons)
    async with Peer(broker.port, "viewer") as viewer:
        await viewer.subscribe(STATE)
        await viewer.expect(STATE, lambda m: state_of(m)["target"] == "active" and len(state_of(m)["holds"]) == 1)
    code, out, err = await cli("--mqtt", f"127.0.0.1:{broker.port}", "--node", NODE, "--username", "viewer",
                               "--password", PASSWORDS["viewer"], "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["source"] == "mqtt" and status["online"] is True
    assert status["target"] == "active"
    assert status["holds"] == 1 and status["hold_details"][0]["owner"] == "alice"
    assert set(status["watts"]) == {"accelerator", "gateway", "mcu"}
    assert status["can_connected"] == {"vehicle": True}

    code, out, err = await cli("--mqtt", f"127.0.0.1:{broker.port}", "--node", NODE, "--username", "viewer",
                               "--password", PASSWORDS["viewer"])
    assert code == 0, err
    assert "online" in out and "alice" in out and "can vehicle" in out


async def test_status_reports_what_it_cannot_reach(broker: Broker) -> None:
    code, _, err = await cli("--url", f"http://127.0.0.1:{free_port()}/metrics", "--wait", "2")
    assert code == 1 and "cannot read" in err
    code, _, err = await cli("--mqtt", f"127.0.0.1:{broker.port}", "--node", "nobody", "--username", "viewer",
                             "--password", PASSWORDS["viewer"], "--wait", "1")
    assert code == 1 and "no retained state" in err
    code, _, err = await cli("--mqtt", f"127.0.0.1:{broker.port}", "--node", NODE, "--username", "viewer",
                             "--password", "wrong", "--wait", "2")
    assert code == 1 and "MQTT" in err


def test_status_from_metrics_rejects_other_endpoints() -> None:
    with pytest.raises(StatusError, match="accelerator_state"):
        status_from_metrics("# HELP up Up.\n# TYPE up gauge\nup 1\n")


def test_can_buses_from_mqtt_state_and_malformed_ones_ignored() -> None:
    status = status_from_mqtt({"state": "idle", "can": {"vehicle": {"connected": False}, "chassis": 3}}, "online")
    assert status["can_connected"] == {"vehicle": False}
    assert ("can vehicle", "DISCONNECTED (reopening)") in status_rows(status)
    assert status_from_mqtt({"state": "idle", "can": "not an object"}, "online")["can_connected"] == {}
