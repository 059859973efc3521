"""MQTT telemetry and control (ARCHITECTURE.md §6): `<prefix>/<node>/status|state|set|response`.

The bridge is a daemon part. It never publishes from the decision path: decision listeners
and telemetry hooks only drop a snapshot into a one-slot, latest-wins buffer; a task of the
connection publishes from there at most every `publish_interval_ms`. Without a broker the
buffer just keeps being overwritten (counted), and the decision loop never notices.

One aiomqtt Client is reused for every connection (PITFALLS.md, aiomqtt): each session
subscribes, announces `online` and republishes state; a lost session backs off exponentially.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiomqtt

from ..config import MqttConfig
from .clock import Clock
from .control import CommandProcessor, CommandResult
from .host import Events, Snapshot, StateExtra, Undo
from .metrics import Metrics
from .tasks import cancel_and_wait


class MqttHost(Events, Protocol):
    """What the bridge needs of the daemon: its events and a consistent snapshot."""

    def snapshot(self) -> Snapshot: ...

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
#: Heartbeat: state is republished this many publish intervals after the last one anyway.
HEARTBEAT_INTERVALS = 10
RECONNECT_MIN_S = 0.5
#: Commands waiting to be handled; beyond this aiomqtt drops them (the operator sees no reply).
MAX_QUEUED_COMMANDS = 64
#: How long a clean stop may spend saying `offline` and disconnecting.
STOP_TIMEOUT_S = 5.0


class Topics:
    def __init__(self, prefix: str, node: str) -> None:
        base = f"{prefix}/{node}"
        self.status = f"{base}/status"
        self.state = f"{base}/state"
        self.set = f"{base}/set"
        self.response = f"{base}/response"


class LatestOnly:
    """A one-slot buffer between the decision loop and the publisher: `put` never blocks and
    never grows; a snapshot replaced before it was published is counted as dropped."""

    def __init__(self) -> None:
        self._item: Snapshot | None = None
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, item: Snapshot) -> None:
        if self._item is not None:
            self.dropped += 1
        self._item = item
        self._ready.set()

    def take(self) -> Snapshot | None:
        item, self._item = self._item, None
        self._ready.clear()
        return item

    async def wait(self, within_s: float) -> bool:
        """True when an item is there, False after `within_s` seconds without one."""
        try:
            await asyncio.wait_for(self._ready.wait(), within_s)
        except TimeoutError:
            return False
        return True


def state_payload(snap: Snapshot, extra: Mapping[str, Any] | None = None) -> bytes:
    """The retained `state` document (docs/mqtt.md). `extra`: the services' `state_extra()`
    (watchdog, leases, nm), added under their own keys; never over a key of the document."""
    body: dict[str, Any] = {
        "state": snap.state.value,
        "target": snap.target.value,
        "reason": snap.reason,
        "active_demands": list(snap.active_demands),
        "stale_signals": list(snap.stale_signals),
        "watts": {k: round(v, 3) for k, v in snap.watts.items()},
        "joules": {k: round(v, 3) for k, v in snap.joules.items()},
        "holds": [
            {"id": h.id, "owner": h.owner, "reason": h.reason, "mode": h.mode.value,
             "expires_in_s": round(max(0.0, h.expires_at - snap.time), 3), "priority": h.priority}
            for h in snap.holds
        ],
        "wakes": snap.wakes,
        "sleeps": snap.sleeps,
        # Wall-clock epoch seconds: the snapshot's own time is the daemon's monotonic clock,
        # meaningless to anyone reading the broker.
        "time": round(time.time(), 3),
    }
    for key, value in (extra or {}).items():
        body.setdefault(key, value)
    return json.dumps(body, separators=(",", ":")).encode()


def service_extras(parts: Iterable[StateExtra]) -> dict[str, Any]:
    """Merged `state_extra()` of the parts the assembly passed (lifecycle, leases, NM, ...). A
    failing one is left out: telemetry must not stop over one part's bug."""
    extra: dict[str, Any] = {}
    for service in parts:
        try:
            extra.update(service.state_extra())
        except Exception as exc:  # any bug in one service's extras: drop them, keep the state
            log.error("state_extra of %s failed: %s", type(service).__name__, exc)
    return extra


def change_key(snap: Snapshot) -> tuple[Any, ...]:
    """What makes a state message worth sending before the heartbeat (watts drift all the time
    and ride on the heartbeat)."""
    return (snap.state, snap.target, snap.reason, snap.active_demands, snap.stale_signals,
            tuple(h.id for h in snap.holds))


def discovery_configs(cfg: MqttConfig, node: str, topics: Topics, domains: list[str]) -> dict[str, bytes]:
    """Home Assistant MQTT discovery: one sensor for the accelerator state, one power and one
    energy sensor per domain, all unavailable while the daemon's status says `offline`."""
    device = {"identifiers": [f"cerebellumd_{node}"], "name": f"cerebellumd {node}",
              "manufacturer": "cerebellumd", "model": "gateway power manager"}
    common = {"state_topic": topics.state, "availability_topic": topics.status,
              "payload_available": "online", "payload_not_available": "offline", "device": device}
    sensors: dict[str, dict[str, Any]] = {
        "accelerator_state": {"name": "Accelerator state", "value_template": "{{ value_json.state }}",
                              "icon": "mdi:chip"},
    }
    for domain in domains:
        sensors[f"{domain}_power"] = {
            "name": f"{domain} power", "device_class": "power", "unit_of_measurement": "W",
            "state_class": "measurement", "value_template": f"{{{{ value_json.watts['{domain}'] }}}}"}
        sensors[f"{domain}_energy"] = {
            "name": f"{domain} energy", "device_class": "energy", "unit_of_measurement": "kWh",
            "state_class": "total_increasing",
            "value_template": f"{{{{ (value_json.joules['{domain}'] / 3600000) | round(6) }}}}"}
    out = {}
    for key, sensor in sensors.items():
        object_id = f"{node}_{key}"
        body = {**sensor, **common, "unique_id": f"cerebellumd_{object_id}", "object_id": object_id}
        out[f"homeassistant/sensor/{object_id}/config"] = json.dumps(body).encode()
    return out


def command_id(payload: bytes) -> str | None:
    """Best-effort id of a command that will not be applied (so the reply can still name it)."""
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def build_tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """Blocking (reads certificates): call it off the loop."""
    if cfg.tls_ca_file is None:
        return None
    context = ssl.create_default_context(cafile=str(cfg.tls_ca_file))
    if cfg.tls_cert_file is not None:
        context.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file) if cfg.tls_key_file else None)
    return context


def read_password(path: Path) -> str:
    """Blocking: call it off the loop. The trailing newline editors add is not part of it."""
    return path.read_text(encoding="utf-8").rstrip("\r\n")


class MqttBridge:
    def __init__(self, cfg: MqttConfig, *, node: str, domains: Sequence[str], host: MqttHost,
                 commands: CommandProcessor, clock: Clock, metrics: Metrics,
                 extras: Sequence[StateExtra] = ()) -> None:
        self._host = host
        self._commands_processor = commands
        self._clock = clock
        self._metrics = metrics
        self._extras = tuple(extras)
        self._domains = tuple(domains)
        self._undo: list[Undo] = []
        self.cfg = cfg
        self.node = node
        self.topics = Topics(self.cfg.prefix, self.node)
        self.buffer = LatestOnly()
        self.connected = asyncio.Event()
        self.connections = 0  # successful sessions so far (tests and logs)
        self._client: aiomqtt.Client | None = None
        self._password: str | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._last_key: tuple[Any, ...] | None = None
        self._last_ack = 0.0
        self._commands = metrics.commands
        for result in ("ok", "error"):
            metrics.commands.labels("mqtt", result)
        self._dropped = metrics.counter(
            "cerebellumd_mqtt_state_dropped", "State snapshots replaced by a newer one before they "
            "were published (coalesced or no broker).")
        self._published = metrics.counter(
            "cerebellumd_mqtt_published", "Messages published to the broker by topic kind.", ["kind"])
        self._reconnects = metrics.counter(
            "cerebellumd_mqtt_connection_failures", "Failed or lost broker connections.")

    # -- the decision side: never blocks, never publishes ------------------------------------

    def _offer(self, snap: Snapshot) -> None:
        before = self.buffer.dropped
        self.buffer.put(snap)
        self._dropped.inc(self.buffer.dropped - before)
        self._last_key = change_key(snap)

    def _on_telemetry(self, _now: float) -> None:
        snap = self._host.snapshot()
        if change_key(snap) != self._last_key:
            self._offer(snap)

    # -- lifecycle ---------------------------------------------------------------------------

    async def async_start(self) -> None:
        cfg = self.cfg
        password = cfg.password
        if cfg.password_file is not None:
            password = await asyncio.to_thread(read_password, cfg.password_file)
        self._password = password
        self._tls_context = await asyncio.to_thread(build_tls_context, cfg)
        self._client = self._new_client()
        self._stop.clear()
        self._undo += [self._host.on_decision(self._offer), self._host.on_telemetry(self._on_telemetry)]
        # Not awaited: an absent broker must not hold up the daemon's start.
        self._task = asyncio.create_task(self._run(), name="mqtt")

    async def async_stop(self) -> None:
        while self._undo:
            self._undo.pop()()
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("mqtt: clean stop took longer than %.0f s; dropping the connection", STOP_TIMEOUT_S)
            await cancel_and_wait(task)
        self._set_connected(False)

    def _new_client(self) -> aiomqtt.Client:
        cfg = self.cfg
        return aiomqtt.Client(
            cfg.host, cfg.port, username=cfg.username, password=self._password,
            identifier=f"cerebellumd-{self.node}", keepalive=cfg.keepalive_s,
            will=aiomqtt.Will(self.topics.status, OFFLINE, qos=1, retain=True),
            tls_context=self._tls_context, max_queued_incoming_messages=MAX_QUEUED_COMMANDS,
            timeout=cfg.keepalive_s, clean_session=True,
        )

    # -- connection loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._stop.is_set():
            try:
                await self._session()
                delay = RECONNECT_MIN_S
            except aiomqtt.MqttReentrantError:
                # aiomqtt 2.x keeps its reuse lock when a graceful disconnect times out (a
                # dead link): that client can never connect again, so take a fresh one.
                log.warning("mqtt: client left locked by a failed disconnect; replacing it")
                self._client = self._new_client()
            except aiomqtt.MqttError as exc:
                log.warning("mqtt %s:%d: %s; retrying in %.1f s", self.cfg.host, self.cfg.port, exc, delay)
            except Exception:  # a bug in one session must not end MQTT for the daemon's lifetime
                log.exception("mqtt: unexpected error; retrying in %.1f s", delay)
            if self._stop.is_set():
                break
            self._set_connected(False)
            self._reconnects.inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    async def _session(self) -> None:
        client = self._client
        assert client is not None
        async with client:
            # After a lost connection aiomqtt 2.x may return from `__aenter__` before the
            # CONNACK; a SUBACK proves the broker accepted us.
            await client.subscribe(self.topics.set, qos=1)
            await self._publish(client, self.topics.status, ONLINE, retain=True, kind="status")
            if self.cfg.homeassistant_discovery:
                domains = list(self._domains)
                for topic, body in discovery_configs(self.cfg, self.node, self.topics, domains).items():
                    await self._publish(client, topic, body, retain=True, kind="discovery")
            await self._publish(client, self.topics.state,
                                state_payload(self._host.snapshot(), service_extras(self._extras)),
                                retain=True, kind="state")
            self.buffer.take()  # just published: what was waiting is older
            self.connections += 1
            self._set_connected(True)
            log.info("mqtt connected to %s:%d as %s", self.cfg.host, self.cfg.port, client.identifier)
            await _first_to_finish(
                self._commands_loop(client),
                self._publisher(client),
                self._watchdog(client),
                self._stop.wait(),
            )
            # Reached only on a clean stop: say so before the graceful disconnect (which
            # tells the broker to discard the Will).
            self._set_connected(False)
            await self._publish(client, self.topics.status, OFFLINE, retain=True, kind="status",
                                ack_within_s=STOP_TIMEOUT_S / 2)

    def _set_connected(self, value: bool) -> None:
        self._metrics.mqtt_connected.set(1 if value else 0)
        if value:
            self.connected.set()
        else:
            self.connected.clear()

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool,
                       kind: str, ack_within_s: float | None = None) -> None:
        await client.publish(topic, payload, qos=1, retain=retain, timeout=ack_within_s)
        self._last_ack = time.monotonic()  # QoS 1: returning means the broker acknowledged
        self._published.labels(kind).inc()

    # -- session tasks: each returns only on stop or raises MqttError ------------------------

    async def _commands_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            result = self.handle_command(payload, retained=message.retain)
            await self._publish(client, self.topics.response, result.to_json().encode(), retain=False,
                                kind="response")

    def handle_command(self, payload: bytes, *, retained: bool) -> CommandResult:
        if retained:
            # A retained command would be replayed on every reconnect, long after it was meant.
            result = CommandResult(command_id(payload), False, "retained commands are ignored; publish without retain")
        else:
            result = self._commands_processor.handle_payload(payload, self._clock.now())
        self._commands.labels("mqtt", "ok" if result.ok else "error").inc()
        log.info("mqtt command %s: %s", result.id, "ok" if result.ok else result.error)
        if result.ok and not result.duplicate:
            self._offer(self._host.snapshot())
        return result

    async def _publisher(self, client: aiomqtt.Client) -> None:
        interval = self.cfg.publish_interval_ms / 1000
        heartbeat = interval * HEARTBEAT_INTERVALS
        last = time.monotonic()
        while True:
            changed = await self.buffer.wait(heartbeat)
            if changed:
                # Rate limit: wait out the interval, then send whatever is latest by then.
                pause = last + interval - time.monotonic()
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), pause)
                if self._stop.is_set():
                    return
            snap = self.buffer.take() if changed else None
            await self._publish(client, self.topics.state,
                                state_payload(snap or self._host.snapshot(), service_extras(self._extras)),
                                retain=True, kind="state")
            last = time.monotonic()

    async def _watchdog(self, client: aiomqtt.Client) -> None:
        """A half-open TCP connection can look alive for minutes; aiomqtt may notice a missed
        keepalive only at the next publish. Probe with a QoS 1 publish when nothing was
        acknowledged for a keepalive period, and end the session if the probe times out."""
        keepalive = float(self.cfg.keepalive_s)
        while True:
            idle = time.monotonic() - self._last_ack
            if idle < keepalive:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), keepalive - idle)
                if self._stop.is_set():
                    return
                continue
            await self._publish(client, self.topics.status, ONLINE, retain=True, kind="status",
                                ack_within_s=keepalive)


async def _first_to_finish(*awaitables: Awaitable[Any]) -> None:
    """Run together until one returns or raises; cancel the rest; re-raise its exception."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


__all__ = ["MqttBridge", "Topics", "discovery_configs", "state_payload"]
