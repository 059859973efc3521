"""daemon/mqtt against a real mosquitto (password file + ACL, started per test on a free port):
status with Last Will, retained state, commands and replies, ACL roles, reconnects, and a
decision loop that goes on whatever the broker does."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from cerebellumd.config import builtin_example, parse_config
from cerebellumd.daemon.mqtt import MqttBridge
from cerebellumd.daemon.runtime import Daemon

from .helpers import free_port

PASSWORDS = {"cerebellumd": "daemon-secret", "operator": "operator-secret", "viewer": "viewer-secret"}
DEADLINE_S = 15.0
POLL_S = 0.02  # poll interval of the deadline loops below
NODE = "gw1"
SET = f"cerebellumd/{NODE}/set"
STATUS = f"cerebellumd/{NODE}/status"
STATE = f"cerebellumd/{NODE}/state"
RESPONSE = f"cerebellumd/{NODE}/response"

# Only the operator may command; the daemon writes its topics (and HA discovery) and reads set.
ACL = """\
user cerebellumd
topic write cerebellumd/+/status
topic write cerebellumd/+/state
topic write cerebellumd/+/response
topic read cerebellumd/+/set
topic write homeassistant/#

user operator
topic write cerebellumd/+/set
topic read cerebellumd/#
topic read homeassistant/#

user viewer
topic read cerebellumd/+/status
topic read cerebellumd/+/state
"""

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None,
    reason="mosquitto / mosquitto_passwd not installed")




# -- the broker ------------------------------------------------------------------------------


@dataclass
class Broker:
    """A mosquitto with a generated config, password file and ACL. Blocking methods: call them
    through asyncio.to_thread from tests that have a daemon on the loop."""

    directory: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    tls: tuple[Path, Path, Path] | None = None  # (ca, server cert, server key)

    def prepare(self) -> None:
        passwd = self.directory / "passwd"
        passwd.touch(mode=0o600)
        for user, password in PASSWORDS.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True,
                           capture_output=True, timeout=30)
        (self.directory / "acl").write_text(ACL)
        lines = ["per_listener_settings false", "allow_anonymous false",
                 f"password_file {passwd}", f"acl_file {self.directory / 'acl'}",
                 f"listener {self.port} 127.0.0.1", "persistence false"]
        if self.tls is not None:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if os.geteuid() == 0:
            lines.append("user root")  # the dropped-to user could not read pytest's 0700 tmp dir
        (self.directory / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        log = (self.directory / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.directory / "mosquitto.conf"), "-v"],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + DEADLINE_S
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(POLL_S)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def broker_dir(tmp_path: Path) -> Path:
    d = tmp_path / "broker"
    d.mkdir()
    return d


@pytest.fixture
def broker(broker_dir: Path) -> Iterator[Broker]:
    b = Broker(broker_dir)
    b.prepare()
    b.start()
    try:
        yield b
    finally:
        b.stop()


# -- MQTT peers (operator, viewer, ...) -------------------------------------------------------


class Peer:
    """An aiomqtt client that collects every message it receives."""

    def __init__(self, port: int, user: str) -> None:
        self.user = user
        self.client = aiomqtt.Client("127.0.0.1", port, username=user, password=PASSWORDS[user],
                                     identifier=f"test-{user}-{uuid.uuid4().hex[:8]}")
        self.received: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Peer:
        await self.client.__aenter__()
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        async for message in self.client.messages:
            self.received.put_nowait(message)

    async def subscribe(self, topic: str) -> None:
        await self.client.subscribe(topic, qos=1)

    async def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        await self.client.publish(topic, payload, qos=1, retain=retain)  # returns on PUBACK

    async def command(self, **body: Any) -> None:
        await self.publish(SET, json.dumps(body))

    async def expect(self, topic: str, match: Callable[[aiomqtt.Message], bool] = lambda m: True,
                     within_s: float = DEADLINE_S) -> aiomqtt.Message:
        """The next message on `topic` that matches; others are skipped."""
        async with asyncio.timeout(within_s):
            while True:
                m = await self.received.get()
                if m.topic.matches(topic) and match(m):
                    return m

    async def response(self, cmd_id: str | None) -> dict[str, Any]:
        m = await self.expect(RESPONSE, lambda m: json.loads(payload(m)).get("id") == cmd_id)
        assert not m.retain, "responses must not be retained"
        return dict(json.loads(payload(m)))


def payload(m: aiomqtt.Message) -> bytes:
    assert isinstance(m.payload, bytes)
    return m.payload


def state_of(m: aiomqtt.Message) -> dict[str, Any]:
    return dict(json.loads(payload(m)))


# -- the daemon -------------------------------------------------------------------------------


def daemon_config_text(port: int, password_file: Path, **mqtt: Any) -> str:
    """The shipped demo config, on a bus of its own, quiet (no traffic, and a silent bus must
    not wake the accelerator here, so holds are what wakes it), with MQTT on."""
    text = builtin_example()
    text = text.replace('channel = "cerebellumd-demo"', f'channel = "mqtt-test-{uuid.uuid4().hex}"')
    text = text.replace('on_stale = "wake"', 'on_stale = "ignore"')
    text = text.replace('node = "demo"', f'node = "{NODE}"')
    text = text.replace("port = 9108", "port = 0")
    options = {"enabled": True, "host": "127.0.0.1", "port": port, "username": "cerebellumd",
               "password_file": str(password_file), "publish_interval_ms": 100, "keepalive_s": 5,
               "reconnect_max_s": 0.5, **mqtt}
    return text + "\n[mqtt]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    p = tmp_path / "mqtt.password"
    p.write_text(PASSWORDS["cerebellumd"] + "\n")
    return p


class Daemons:
    """Starts daemons for a test; whatever the test did not stop is stopped in teardown."""

    def __init__(self, password_file: Path) -> None:
        self.password_file = password_file
        self.running: list[Daemon] = []

    async def start(self, port: int, **mqtt: Any) -> Daemon:
        text = await asyncio.to_thread(daemon_config_text, port, self.password_file, **mqtt)
        config = await asyncio.to_thread(parse_config, text)
        daemon = await Daemon.async_create(config)
        await daemon.async_start()
        self.running.append(daemon)
        return daemon

    async def stop(self, daemon: Daemon) -> None:
        self.running.remove(daemon)
        await daemon.async_stop()


@pytest.fixture
async def daemons(password_file: Path) -> AsyncIterator[Daemons]:
    d = Daemons(password_file)
    try:
        yield d
    finally:
        for daemon in list(d.running):
            await d.stop(daemon)


def bridge_of(daemon: Daemon) -> MqttBridge:
    return next(s for s in daemon.parts if isinstance(s, MqttBridge))


async def until(condition: Callable[[], bool], what: str, within_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_S)


def gauge(daemon: Daemon, name: str, **labels: str) -> float | None:
    return daemon.metrics.registry.get_sample_value(name, labels)


def command_count(daemon: Daemon, result: str) -> float:
    return gauge(daemon, "cerebellumd_commands_total", source="mqtt", result=result) or 0.0


# -- tests ------------------------------------------------------------------------------------


async def test_online_retained_and_state_published_retained(broker: Broker, daemons: Daemons) -> None:
    daemon = await daemons.start(broker.port)
    await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
    assert gauge(daemon, "cerebellumd_mqtt_connected") == 1.0
    # A viewer that comes later still learns both from the broker: they are retained.
    async with Peer(broker.port, "viewer") as viewer:
        await viewer.subscribe(f"cerebellumd/{NODE}/#")
        status = await viewer.expect(STATUS)
        assert (payload(status), status.retain) == (b"online", True)
        state = await viewer.expect(STATE)
        assert state.retain
        # Without any change the heartbeat (10 publish intervals = 1 s here) still sends fresh
        # watts and joules.
        later = await viewer.expect(STATE, lambda m: state_of(m)["joules"]["gateway"] > 0, within_s=5)
    body = state_of(state)
    assert set(body) >= {"state", "target", "reason", "active_demands", "stale_signals", "watts", "joules",
                         "holds", "wakes", "sleeps", "time"}
    assert set(body["watts"]) == {"accelerator", "gateway", "mcu"} == set(body["joules"])
    body = state_of(later)
    assert body["can"]["vehicle"]["connected"] is True and body["can"]["vehicle"]["frames"] >= 0
    assert body["watts"]["gateway"] == pytest.approx(3.5)
    assert body["holds"] == []
    assert abs(body["time"] - time.time()) < 60


async def test_hold_wakes_release_removes_and_duplicates_are_not_applied(broker: Broker, daemons: Daemons) -> None:
    daemon = await daemons.start(broker.port)
    await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
    async with Peer(broker.port, "operator") as operator:
        await operator.subscribe(f"cerebellumd/{NODE}/#")
        await until(lambda: daemon.snapshot().target.value != "active", "a resting target without demands")

        await operator.command(command="hold", owner="alice", reason="bench test", ttl_s=300, id="h1")
        reply = await operator.response("h1")
        assert reply == {"id": "h1", "ok": True, "holds": 1}
        await until(lambda: daemon.snapshot().target.value == "active", "the hold to wake the accelerator")
        held = await operator.expect(STATE, lambda m: state_of(m)["target"] == "active")
        assert state_of(held)["reason"].startswith("hold")
        [hold] = state_of(held)["holds"]
        assert hold["owner"] == "alice" and hold["reason"] == "bench test" and hold["mode"] == "awake"
        assert 290 < hold["expires_in_s"] <= 300

        await operator.command(command="release", owner="alice", id="r1")
        assert (await operator.response("r1"))["ok"] is True
        await operator.expect(STATE, lambda m: state_of(m)["holds"] == [])
        assert daemon.holds.active(daemon.clock.now()) == ()

        # The same id again is answered from memory, not applied a second time.
        await operator.command(command="hold", owner="alice", reason="bench test", id="h1")
        again = await operator.response("h1")
        assert again["ok"] is True and again.get("duplicate") is True
        assert daemon.holds.active(daemon.clock.now()) == ()
    assert command_count(daemon, "ok") == 3.0
    assert command_count(daemon, "error") == 0.0


async def test_bad_commands_get_error_replies_and_are_counted(broker: Broker, daemons: Daemons) -> None:
    daemon = await daemons.start(broker.port)
    await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
    async with Peer(broker.port, "operator") as operator:
        await operator.subscribe(RESPONSE)
        await operator.publish(SET, b"this is not json")
        not_json = await operator.response(None)
        await operator.command(command="explode", owner="alice", id="m2")
        unknown = await operator.response("m2")
        await operator.command(command="hold", owner="alice")
        missing_id = await operator.response(None)
        await operator.publish(SET, b"\xff\xfe")
        not_utf8 = await operator.response(None)
        # still alive and obeying afterwards
        await operator.command(command="wake", owner="alice", id="ok1")
        assert (await operator.response("ok1"))["ok"] is True
    assert not_json["ok"] is False and "not JSON" in not_json["error"]
    assert unknown["ok"] is False and unknown["error"].startswith("command")
    assert missing_id["ok"] is False and missing_id["error"].startswith("id")
    assert not_utf8["ok"] is False
    assert command_count(daemon, "error") == 4.0
    assert command_count(daemon, "ok") == 1.0


async def test_viewer_commands_never_reach_the_daemon(broker: Broker, daemons: Daemons) -> None:
    daemon = await daemons.start(broker.port)
    await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
    async with Peer(broker.port, "viewer") as viewer, Peer(broker.port, "operator") as operator:
        await operator.subscribe(RESPONSE)
        # The broker acknowledges the viewer's publish and drops it (ACL). It handled it before
        # the operator's sentinel; had it reached the daemon, its reply would come first.
        await viewer.command(command="wake", owner="mallory", id="v1")
        await operator.command(command="release", owner="nobody", id="sentinel")
        first = await operator.expect(RESPONSE)
    assert json.loads(payload(first))["id"] == "sentinel"
    assert command_count(daemon, "ok") + command_count(daemon, "error") == 1.0
    assert all(h.owner != "mallory" for h in daemon.holds.active(daemon.clock.now()))


async def test_retained_command_is_not_replayed(broker: Broker, daemons: Daemons) -> None:
    async with Peer(broker.port, "operator") as operator:
        await operator.publish(SET, json.dumps({"command": "hold", "owner": "alice", "id": "stale"}), retain=True)
        await operator.subscribe(RESPONSE)
        daemon = await daemons.start(broker.port)
        reply = await operator.response("stale")
    assert reply["ok"] is False and "retained" in reply["error"]
    assert daemon.holds.active(daemon.clock.now()) == ()
    assert command_count(daemon, "error") == 1.0


async def test_clean_stop_publishes_offline(broker: Broker, daemons: Daemons) -> None:
    daemon = await daemons.start(broker.port)
    await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
    async with Peer(broker.port, "viewer") as viewer:
        await viewer.subscribe(STATUS)
        assert payload(await viewer.expect(STATUS)) == b"online"
        await daemons.stop(daemon)
        offline = await viewer.expect(STATUS)
        assert payload(offline) == b"offline"
    async with Peer(broker.port, "viewer") as late:
        await late.subscribe(STATUS)
        retained = await late.expect(STATUS)
    assert (payload(retained), retained.retain) == (b"offline", True)
    assert gauge(daemon, "cerebellumd_mqtt_connected") == 0.0


async def test_state_is_rate_limited_and_latest_wins(broker: Broker, daemons: Daemons) -> None:
    interval_s = 0.4
    daemon = await daemons.start(broker.port, publish_interval_ms=int(interval_s * 1000))
    await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
    async with Peer(broker.port, "operator") as operator:
        await operator.subscribe(STATE)
        await operator.expect(STATE)  # the retained one
        # A burst of changes, each its own hold: far more than one interval can carry.
        for i in range(8):
            await operator.command(command="wake", owner=f"op{i}", id=f"w{i}")
        arrivals = []
        final = None
        while final is None:
            m = await operator.expect(STATE)
            arrivals.append(time.monotonic())
            if len(state_of(m)["holds"]) == 8:
                final = m
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Receive times jitter; a gap far below the interval would mean no rate limit at all.
    assert all(g > interval_s * 0.5 for g in gaps), gaps
    assert len(arrivals) < 8, "every change was published: nothing was coalesced"
    assert (gauge(daemon, "cerebellumd_mqtt_state_dropped_total") or 0) > 0


async def test_broker_absent_at_start_then_appears(broker_dir: Path, daemons: Daemons) -> None:
    broker = Broker(broker_dir)
    broker.prepare()
    daemon = await daemons.start(broker.port)  # nothing listens there yet
    before = daemon.decisions
    await until(lambda: daemon.decisions > before + 50, "decisions without a broker")
    assert gauge(daemon, "cerebellumd_mqtt_connected") == 0.0
    await asyncio.to_thread(broker.start)
    try:
        await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
        assert gauge(daemon, "cerebellumd_mqtt_connected") == 1.0
    finally:
        await daemons.stop(daemon)
        await asyncio.to_thread(broker.stop)


async def test_broker_killed_and_restarted(broker: Broker, daemons: Daemons) -> None:
    daemon = await daemons.start(broker.port)
    bridge = bridge_of(daemon)
    await asyncio.wait_for(bridge.connected.wait(), DEADLINE_S)
    await asyncio.to_thread(broker.stop)
    await until(lambda: gauge(daemon, "cerebellumd_mqtt_connected") == 0.0, "mqtt_connected = 0")
    before = daemon.decisions
    await until(lambda: daemon.decisions > before + 50, "decisions to go on without the broker")
    assert bridge.connections == 1

    await asyncio.to_thread(broker.start)  # same port, empty: nothing retained survives
    await until(lambda: bridge.connections == 2, "a reconnect")
    assert gauge(daemon, "cerebellumd_mqtt_connected") == 1.0
    async with Peer(broker.port, "operator") as operator:
        await operator.subscribe(f"cerebellumd/{NODE}/#")
        status = await operator.expect(STATUS)
        state = await operator.expect(STATE)
        assert (payload(status), status.retain) == (b"online", True)
        assert state.retain and "target" in state_of(state)
        await operator.command(command="hold", owner="alice", id="after-restart")
        assert (await operator.response("after-restart"))["ok"] is True
    await until(lambda: daemon.snapshot().target.value == "active", "the hold after the restart")


async def test_homeassistant_discovery(broker: Broker, daemons: Daemons) -> None:
    daemon = await daemons.start(broker.port, homeassistant_discovery=True)
    await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
    async with Peer(broker.port, "operator") as operator:
        await operator.subscribe("homeassistant/sensor/#")
        configs = {}
        async with asyncio.timeout(DEADLINE_S):
            while len(configs) < 7:  # state + power and energy for 3 domains
                m = await operator.expect("homeassistant/sensor/#")
                assert m.retain
                configs[str(m.topic)] = json.loads(payload(m))
    state_cfg = configs[f"homeassistant/sensor/{NODE}_accelerator_state/config"]
    power_cfg = configs[f"homeassistant/sensor/{NODE}_gateway_power/config"]
    for cfg in configs.values():
        assert cfg["availability_topic"] == STATUS
        assert cfg["state_topic"] == STATE
    assert state_cfg["value_template"] == "{{ value_json.state }}"
    assert power_cfg["unit_of_measurement"] == "W" and power_cfg["device_class"] == "power"
    assert len({c["unique_id"] for c in configs.values()}) == 7


async def test_last_will_when_the_daemon_is_killed(broker: Broker, tmp_path: Path, password_file: Path) -> None:
    config = tmp_path / "cerebellumd.toml"
    text = await asyncio.to_thread(daemon_config_text, broker.port, password_file)
    await asyncio.to_thread(config.write_text, text)
    async with Peer(broker.port, "viewer") as viewer:
        await viewer.subscribe(STATUS)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cerebellumd", "run", "--config", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            online = await viewer.expect(STATUS, lambda m: payload(m) == b"online", within_s=60)
            assert online is not None
            proc.send_signal(signal.SIGKILL)  # no chance to say goodbye: the broker must
            offline = await viewer.expect(STATUS)
            assert payload(offline) == b"offline"
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    async with Peer(broker.port, "viewer") as late:
        await late.subscribe(STATUS)
        retained = await late.expect(STATUS)
    assert (payload(retained), retained.retain) == (b"offline", True)


class FreezableProxy:
    """A TCP relay to the broker whose current connections can be frozen: bytes are swallowed
    in both directions while the sockets stay open, as on a half-open link (a NAT or a cable
    that dropped without a FIN). Connections made afterwards relay normally."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self._frozen: list[asyncio.Event] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def freeze_all(self) -> None:
        for frozen in self._frozen:
            frozen.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        frozen = asyncio.Event()
        self._frozen.append(frozen)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, frozen))
            self._tasks.add(task)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, frozen: asyncio.Event) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if not frozen.is_set():
                    dst.write(data)
                    await dst.drain()
        dst.close()


async def test_watchdog_drops_a_half_open_connection(broker: Broker, daemons: Daemons) -> None:
    keepalive_s = 5
    async with FreezableProxy(broker.port) as proxy:
        daemon = await daemons.start(proxy.port, keepalive_s=keepalive_s)
        bridge = bridge_of(daemon)
        await asyncio.wait_for(bridge.connected.wait(), DEADLINE_S)
        proxy.freeze_all()
        frozen_at = time.monotonic()
        await until(lambda: gauge(daemon, "cerebellumd_mqtt_connected") == 0.0, "the dead link to be noticed",
                    within_s=4 * keepalive_s)
        noticed_s = time.monotonic() - frozen_at
        assert noticed_s < 3 * keepalive_s, noticed_s
        # ...and it comes back over a fresh connection, with the commands working again.
        await until(lambda: bridge.connections == 2, "a reconnect through a fresh connection", within_s=4 * keepalive_s)
        assert proxy.connections >= 2
        async with Peer(broker.port, "operator") as operator:
            await operator.subscribe(RESPONSE)
            await operator.command(command="wake", owner="alice", id="after-watchdog")
            assert (await operator.response("after-watchdog"))["ok"] is True
        await daemons.stop(daemon)  # while the relay still stands


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, pem = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(pem),
                    "-days", "1", "-subj", f"/CN={name}"], check=True, capture_output=True, timeout=60)
    return pem, key


def make_server_cert(directory: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, csr, pem, ext = (directory / n for n in ("server.key", "server.csr", "server.pem", "server.ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=localhost"], check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                    "-CAcreateserial", "-out", str(pem), "-days", "1", "-extfile", str(ext)],
                   check=True, capture_output=True, timeout=60)
    return pem, key


@pytest.fixture
def tls_broker(broker_dir: Path) -> Iterator[Broker]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    ca = make_ca(broker_dir, "test-ca")
    cert, key = make_server_cert(broker_dir, ca)
    make_ca(broker_dir, "other-ca")
    b = Broker(broker_dir, tls=(ca[0], cert, key))
    b.prepare()
    b.start()
    try:
        yield b
    finally:
        b.stop()


async def test_tls_connects_with_the_right_ca_only(tls_broker: Broker, daemons: Daemons) -> None:
    ca = tls_broker.directory / "test-ca.pem"
    daemon = await daemons.start(tls_broker.port, tls_ca_file=str(ca))
    await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
    assert gauge(daemon, "cerebellumd_mqtt_connected") == 1.0
    # A CA that did not sign the broker's certificate: no session, and the loop goes on.
    stranger = await daemons.start(tls_broker.port, tls_ca_file=str(tls_broker.directory / "other-ca.pem"))
    failures = "cerebellumd_mqtt_connection_failures_total"
    await until(lambda: (gauge(stranger, failures) or 0) >= 2, "failed TLS handshakes")
    assert gauge(stranger, "cerebellumd_mqtt_connected") == 0.0
    before = stranger.decisions
    await until(lambda: stranger.decisions > before + 20, "decisions without a session")


async def test_state_carries_watchdog_and_leases(broker: Broker, password_file: Path, tmp_path: Path) -> None:
    """The services' state_extra() (lifecycle watchdog, leases) ride in the retained state,
    beside the documented keys, never over them."""
    sock = tmp_path / "leases.sock"
    text = await asyncio.to_thread(daemon_config_text, broker.port, password_file)
    config = await asyncio.to_thread(parse_config, text + f'\n[leases]\nenabled = true\npath = "{sock}"\n')
    daemon = await Daemon.async_create(config)
    await daemon.async_start()
    try:
        await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b'{"op":"acquire","app":"lane_keeper","ttl_s":30,"priority":"safety","max_duration_s":60}\n')
        await writer.drain()
        reply = json.loads(await reader.readline())
        assert reply.get("ok") is True, reply
        async with Peer(broker.port, "viewer") as viewer:
            await viewer.subscribe(f"cerebellumd/{NODE}/#")
            body = state_of(await viewer.expect(STATE, lambda m: bool(state_of(m).get("leases", {}).get("leases"))))
        writer.close()
        await writer.wait_closed()
    finally:
        await daemon.async_stop()
    assert body["watchdog"]["alarm"] is None and "phase" in body["watchdog"]
    assert [lease["app"] for lease in body["leases"]["leases"]] == ["lane_keeper"]
    assert {"state", "target", "reason", "holds", "wakes"} <= set(body)


async def test_remote_tool_hold_with_priority_ranks_as_a_lease(broker: Broker, password_file: Path,
                                                               tmp_path: Path) -> None:
    """A remote tool's `sleep` over MQTT with priority `safety` beats an app's normal lease on
    the Unix socket (the lease rule), shows its priority in the state, and starts no grace."""
    sock = tmp_path / "leases.sock"
    text = await asyncio.to_thread(daemon_config_text, broker.port, password_file)
    config = await asyncio.to_thread(parse_config, text + f'\n[leases]\nenabled = true\npath = "{sock}"\n')
    daemon = await Daemon.async_create(config)
    await daemon.async_start()
    try:
        await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b'{"op":"acquire","app":"infotainment","ttl_s":60,"priority":"normal","max_duration_s":600}\n')
        await writer.drain()
        assert json.loads(await reader.readline()).get("ok") is True
        await until(lambda: daemon.snapshot().target.value == "active", "the lease to wake the accelerator")
        async with Peer(broker.port, "operator") as tool:
            await tool.subscribe(f"cerebellumd/{NODE}/#")
            await tool.command(command="sleep", owner="fleet_tool", reason="depot", priority="safety", id="s1")
            assert (await tool.response("s1"))["ok"] is True
            rested = await tool.expect(STATE, lambda m: state_of(m)["target"] != "active")
            await tool.command(command="sleep", owner="x", priority="urgent", id="bad")
            bad = await tool.response("bad")
        body = state_of(rested)
        [mine] = [h for h in body["holds"] if h["owner"] == "fleet_tool"]
        assert mine["mode"] == "sleep" and mine["priority"] == 300
        assert bad["ok"] is False and "priority" in bad["error"]
        assert (gauge(daemon, "cerebellumd_lease_overrides_total") or 0) == 0
        writer.close()
        await writer.wait_closed()
    finally:
        await daemon.async_stop()


async def test_a_capped_command_is_a_lease_ended_at_its_cap(broker: Broker, password_file: Path,
                                                            tmp_path: Path) -> None:
    """`set` with max_duration_s: garage-mode work from a remote tool. It becomes a capped lease
    (shown in the state's leases), the daemon ends it at the cap whatever the tool does, and the
    end is counted by reason; a bad cap is refused with the reason."""
    sock = tmp_path / "leases.sock"
    text = await asyncio.to_thread(daemon_config_text, broker.port, password_file)
    config = await asyncio.to_thread(parse_config, text + f'\n[leases]\nenabled = true\npath = "{sock}"\n'
                                     'max_duration_s = 900\n')
    daemon = await Daemon.async_create(config)
    await daemon.async_start()
    try:
        await asyncio.wait_for(bridge_of(daemon).connected.wait(), DEADLINE_S)
        async with Peer(broker.port, "operator") as tool:
            await tool.subscribe(f"cerebellumd/{NODE}/#")
            await tool.command(command="hold", owner="fleet_tool", reason="model update", max_duration_s=901, id="c0")
            refused = await tool.response("c0")
            await tool.command(command="hold", owner="fleet_tool", reason="model update", max_duration_s=1.5,
                               max_energy_wh=50, id="c1")
            assert (await tool.response("c1"))["ok"] is True
            granted = state_of(await tool.expect(STATE, lambda m: bool(state_of(m)["leases"]["leases"])))
            await until(lambda: daemon.snapshot().target.value == "active", "the capped hold to wake it")
            ended = state_of(await tool.expect(
                STATE, lambda m: state_of(m)["leases"]["ended"].get("duration_cap") == 1, within_s=15))
        assert refused["ok"] is False and refused["error"].startswith("bad_cap: max_duration_s must be in (0, 900]")
        [lease] = granted["leases"]["leases"]
        assert (lease["app"], lease["mode"], lease["priority"], lease["max_energy_wh"]) == (
            "mqtt:fleet_tool", "awake", "normal", 50)
        assert lease["ends_in_s"] <= 1.5
        assert ended["leases"]["leases"] == []
        await until(lambda: (gauge(daemon, "cerebellumd_lease_ended_total", reason="duration_cap") or 0) == 1,
                    "the end counted")
        assert (gauge(daemon, "cerebellumd_lease_errors_total", kind="bad_cap") or 0) == 1
    finally:
        await daemon.async_stop()
