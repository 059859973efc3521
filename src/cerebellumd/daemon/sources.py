"""The daemon's inputs besides CAN: SOME/IP notifications, the companion MCU and measured power.

The assembly (`daemon/assembly.py`) builds, from the config:

- one `SomeIpSource` service per `[[someip]]` endpoint: each datagram's fields become samples
  of the signals whose `someip = "notification.field"` names them;
- one `McuSource` service for `[mcu]`: READINGS become samples of the signals whose `mcu`
  names a reading (`battery_v`, `accel_temp_c`, `rail_w`, ...), every HEARTBEAT refreshes
  `ignition` and the latched request (`wake_request`: 1 after WAKE_REQUEST, 0 after
  SLEEP_REQUEST; `request_reason`), and a request is fed at once so a demand on it acts on the
  fast path. It is also the daemon's `PowerDownLink` (`daemon/host.py`): the power-down
  permission and the next wake, sent as acknowledged, repeated MCU commands and counted in
  `cerebellumd_mcu_commands_total{command,result}`. Nothing is fed while the link is silent, so
  its signals go stale by their own `max_age_ms`: no second staleness rule to keep in step with
  the policy's;
- one `PowerReaders` service reading each `hwmon`/`mcu` power domain's sensor every
  `interval_ms`, registered as the ledger's power source of that domain;
- a collector exporting their counters (`cerebellumd_someip_*`, `cerebellumd_mcu_*`,
  `cerebellumd_sensor_*`).

One serial port has one link: with the `mcu` accelerator driver the link is the driver's (its
settings come from `[mcu]`, see config.py) and the driver opens and closes it; otherwise
`McuSource` owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import Config, DomainConfig, McuConfig, SomeIpEndpointConfig, hwmon_options
from ..drivers.accel_mcu import McuPowerSensor
from ..drivers.base import DriverError, PowerSensor
from ..drivers.hwmon import HwmonSensor
from ..drivers.mcu_link import McuLink
from ..drivers.mcu_protocol import ERROR_KINDS as MCU_PARSER_ERRORS
from ..drivers.mcu_protocol import (
    MAX_WAKE_IN_S,
    Heartbeat,
    Message,
    Readings,
    Reason,
    SleepRequest,
    StatusFlags,
    WakeRequest,
)
from ..drivers.someip_options import ERROR_KINDS as SOMEIP_DECODE_ERRORS
from ..drivers.someip_sd_options import SD_ERROR_KINDS
from .clock import Clock
from .host import EnergyHost, PowerDownResult, SampleSink, Undo
from .metrics import Metrics
from .tasks import cancel_and_wait

if TYPE_CHECKING:
    from ..drivers.someip_sd_udp import SdTransport

log = logging.getLogger(__name__)

SOMEIP_ERROR_KINDS = (*SOMEIP_DECODE_ERRORS, "socket_errors", "callback_errors", "bind_failures")
#: Bind errors that say the endpoint's address or interface is not there yet (a VLAN of the vehicle
#: network configured after the daemon started): the endpoint binds later, with backoff, instead of
#: failing the start. Any other bind error (the port taken, no permission) fails the start.
ADDRESS_NOT_YET = frozenset({errno.EADDRNOTAVAIL, errno.ENODEV})
_BIND_RETRY_S = 0.5
_BIND_RETRY_MAX_S = 30.0
MCU_LINK_ERROR_KINDS = ("open_failures", "connections_lost", "stale", "ack_timeouts", "nacks", "listener_errors",
                        "command_repeats")


def signal_routes(config: Config, source: str) -> dict[str, tuple[str, ...]]:
    """{source key: our signal names} for `source` in ("someip", "mcu"); one key may feed
    several signals (e.g. the same temperature under two names)."""
    routes: dict[str, list[str]] = defaultdict(list)
    for name, signal in config.signals.items():
        key = getattr(signal, source)
        if key:
            routes[key].append(name)
    return {k: tuple(v) for k, v in routes.items()}


def _route(values: Mapping[str, float], routes: Mapping[str, tuple[str, ...]]) -> list[tuple[str, float]]:
    return [(ours, value) for key, value in values.items() for ours in routes.get(key, ())]


# -- SOME/IP -------------------------------------------------------------------------------------


class SomeIpSource:
    """One `[[someip]]` endpoint as a daemon service; with `[someip.sd]` its SD client finds
    the services and subscribes to their eventgroups with this endpoint's address."""

    def __init__(self, config: SomeIpEndpointConfig, routes: Mapping[str, tuple[str, ...]],
                 sink: SampleSink, clock: Clock, metrics: Metrics | None = None) -> None:
        self.name = config.name
        self._routes = routes
        self._sink = sink
        self._clock = clock
        # The codec, the receiver and the SD client load only where SOME/IP is configured (their
        # modules hold about 1.5 MB that a gateway without it never needs; docs/PERFORMANCE.md).
        from ..drivers.someip import SomeIpReceiver
        from ..drivers.someip_sd import SdClient
        from ..drivers.someip_sd_udp import SdTransport

        self.receiver = SomeIpReceiver(config, self._on_samples)
        self._address = f"{config.multicast_group or config.host}:{config.port}"
        self.bind_failures = 0
        self._binding: asyncio.Task[None] | None = None
        self.sd: SdTransport | None = (
            SdTransport(SdClient(config.sd), config.host) if config.sd is not None else None)
        self._first_notification: Histogram | None = None
        if self.sd is not None and metrics is not None:
            self._first_notification = metrics.histogram(
                "cerebellumd_someip_sd_first_notification_seconds",
                "Time from the SD client's (re)start (start, reload, server reboot, service lost) to the first "
                "notification that yields samples.", labels=["endpoint"])

    def set_routes(self, routes: Mapping[str, tuple[str, ...]]) -> None:
        """A reloaded `[signals]`: which fields feed which signals, from the next datagram on."""
        self._routes = routes

    def _on_samples(self, values: dict[str, float], mono: float) -> None:
        if self.sd is not None:
            elapsed = self.sd.client.first_notification(mono)
            if elapsed is not None:
                log.info("SOME/IP endpoint %s: first notification %.3f s after the SD (re)start", self.name, elapsed)
                if self._first_notification is not None:
                    self._first_notification.labels(self.name).observe(elapsed)
        samples = _route(values, self._routes)
        if samples:
            self._sink(samples, self._clock.from_monotonic(mono))

    async def async_start(self) -> None:
        """Bind and start the SD client. An address or interface that is not there yet is
        counted (`bind_failures`) and bound later with backoff while the daemon runs (its signals
        stale meanwhile); any other failure fails the start."""
        try:
            await self.receiver.async_start()
        except OSError as exc:
            if exc.errno not in ADDRESS_NOT_YET:
                raise
            self.bind_failures += 1
            log.error("SOME/IP endpoint %s: cannot bind udp %s yet (%s); retrying from %.1f s, doubling up to %.0f s",
                      self.name, self._address, exc.strerror, _BIND_RETRY_S, _BIND_RETRY_MAX_S)
            self._binding = asyncio.create_task(self._async_bind_later(), name=f"someip-bind-{self.name}")
            return
        await self._async_started()

    async def _async_started(self) -> None:
        host, port = self.receiver.local_address
        log.info("SOME/IP endpoint %s on udp %s:%d", self.name, host, port)
        if self.sd is not None:
            try:
                await self.sd.async_start((host, port))
            except BaseException:
                await self.receiver.async_close()
                raise

    async def _async_bind_later(self) -> None:
        delay = _BIND_RETRY_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self.receiver.async_start()
                await self._async_started()
                return
            except OSError as exc:  # still not there, or another failure now: counted, retried
                self.bind_failures += 1
                delay = min(delay * 2, _BIND_RETRY_MAX_S)
                log.warning("SOME/IP endpoint %s: cannot bind udp %s (%s); next in %.1f s",
                            self.name, self._address, exc.strerror, delay)
            except Exception:  # a bug, not the network: said once, not retried in a loop
                log.exception("SOME/IP endpoint %s: start failed; the endpoint stays unbound", self.name)
                return

    @property
    def bound(self) -> bool:
        """Whether the endpoint's socket is bound (False while it waits for its address)."""
        return self.receiver.bound

    async def async_stop(self) -> None:
        binding, self._binding = self._binding, None
        if binding is not None:
            binding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await binding
        if self.sd is not None:
            await self.sd.async_close()
        await self.receiver.async_close()


# -- companion MCU -------------------------------------------------------------------------------


class McuSource:
    """The `[mcu]` link's messages as samples. Starts and stops the link only if it owns it."""

    def __init__(self, config: McuConfig, routes: Mapping[str, tuple[str, ...]], sink: SampleSink,
                 clock: Clock, link: McuLink | None = None) -> None:
        self._routes = routes
        self._sink = sink
        self._clock = clock
        self._owns_link = link is None
        self.link = link if link is not None else McuLink(config.link_options())
        self._hold_s = config.wake_request_hold_ms / 1000 if config.wake_request_hold_ms else None
        self._wake_requested = False
        self._wake_requested_at = 0.0
        self._request_reason = 0
        self.requests: dict[str, int] = {"wake": 0, "sleep": 0}
        self._last_request: tuple[type, int] | None = None
        self._remove_listener: Callable[[], None] = lambda: None
        self._power_down_after_s = config.power_down_after_s
        #: (command, result) -> count: power_down / revoke / next_wake, acked / failed.
        self.commands: dict[tuple[str, str], int] = {
            (c, r): 0 for c in ("power_down", "revoke", "next_wake") for r in ("acked", "failed")}

    def set_routes(self, routes: Mapping[str, tuple[str, ...]]) -> None:
        """A reloaded `[signals]`: which readings feed which signals, from the next message on."""
        self._routes = routes

    def _request_state(self, mono: float) -> dict[str, float]:
        if self._wake_requested and self._hold_s is not None and mono - self._wake_requested_at > self._hold_s:
            self._wake_requested = False  # the MCU asked once and never followed up: let it lapse
        return {"wake_request": 1.0 if self._wake_requested else 0.0,
                "request_reason": float(self._request_reason)}

    def _on_message(self, message: Message) -> None:
        mono = time.monotonic()
        body = message.body
        values: dict[str, float]
        if isinstance(body, Readings):
            values = body.as_signals()
        elif isinstance(body, Heartbeat):
            values = {"ignition": 1.0 if body.flags & StatusFlags.IGNITION_ON else 0.0, **self._request_state(mono)}
        elif isinstance(body, WakeRequest | SleepRequest):
            wake = isinstance(body, WakeRequest)
            # The MCU repeats a request with the same seq until it sees our ACK
            # (docs/mcu-protocol.md): a repeat is the same request, counted once.
            key = (type(body), message.seq)
            if key == self._last_request:
                return
            self._last_request = key
            self.requests["wake" if wake else "sleep"] += 1
            self._wake_requested = wake
            self._wake_requested_at = mono
            self._request_reason = body.reason
            log.info("MCU %s request (reason %d)", "wake" if wake else "sleep", body.reason)
            values = self._request_state(mono)
        else:
            return
        samples = _route(values, self._routes)
        if samples:
            self._sink(samples, self._clock.from_monotonic(mono))

    # -- PowerDownLink ------------------------------------------------------------------------

    async def async_allow_power_down(self, reason: int = Reason.ENERGY_BUDGET,
                                     after_s: float | None = None) -> PowerDownResult:
        """POWER_DOWN_ALLOWED; never raises: an unanswered or refused permission comes back with
        acked=False for the caller to escalate."""
        delay = self._power_down_after_s if after_s is None else min(65535, max(0, round(after_s)))
        return await self._power_command("power_down", True, delay, reason)

    async def async_revoke_power_down(self) -> PowerDownResult:
        return await self._power_command("revoke", False, 0, Reason.UNSPECIFIED)

    async def _power_command(self, name: str, allow: bool, after_s: int, reason: int) -> PowerDownResult:
        try:
            frames = await self.link.async_allow_power_down(allow, after_s, reason)
        except DriverError as exc:
            self.commands[(name, "failed")] += 1
            log.error("MCU: %s not acknowledged: %s", name, exc)
            return PowerDownResult(False, self.link.options.command_attempts, str(exc))
        self.commands[(name, "acked")] += 1
        log.info("MCU acknowledged %s (after %d s, reason %d)", name, after_s, reason)
        return PowerDownResult(True, frames, "acknowledged")

    async def async_request_wake_at(self, when: float | None, reason: int = Reason.TIMER) -> None:
        """NEXT_WAKE for wall time `when` (None cancels); DriverError if the MCU did not take it."""
        if when is None:
            wake_in_s = 0
        else:
            wake_in_s = max(1, math.ceil(when - time.time()))
            if wake_in_s > MAX_WAKE_IN_S:
                raise DriverError(f"next wake in {wake_in_s} s is beyond the MCU's {MAX_WAKE_IN_S} s")
        try:
            await self.link.async_set_next_wake(wake_in_s, reason)
        except DriverError:
            self.commands[("next_wake", "failed")] += 1
            raise
        self.commands[("next_wake", "acked")] += 1
        log.info("MCU will wake the gateway in %d s", wake_in_s) if wake_in_s else log.info("MCU next wake cancelled")

    async def async_start(self) -> None:
        self._remove_listener = self.link.add_listener(self._on_message)
        if self._owns_link:
            await self.link.async_start()

    async def async_stop(self) -> None:
        self._remove_listener()
        self._remove_listener = lambda: None
        if self._owns_link:
            await self.link.async_close()


# -- measured power ------------------------------------------------------------------------------


@dataclass
class _Reader:
    domain: str
    sensor: PowerSensor
    interval_s: float
    watts: float | None = None


class PowerReaders:
    """Reads each measured domain's sensor on its own period; the latest watts are what the
    ledger's power source returns (None until the first good read; a failed read keeps the
    previous value out: the ledger then holds its last watts). Exports the sensors' counters."""

    def __init__(self, sensors: Iterable[tuple[DomainConfig, PowerSensor]], *,
                 energy: EnergyHost | None = None, metrics: Metrics | None = None) -> None:
        self.readers = [_Reader(d.name, s, d.interval_ms / 1000) for d, s in sensors]
        self._energy = energy
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._undo: list[Undo] = []

    def sources(self) -> dict[str, Callable[[], float | None]]:
        return {r.domain: (lambda r=r: r.watts) for r in self.readers}  # type: ignore[misc]

    async def async_start(self) -> None:
        if self._energy is not None:
            self._undo += [self._energy.add_power_source(d, s) for d, s in self.sources().items()]
        if self._metrics is not None and self.readers:
            self._undo.append(self._metrics.register(
                SensorsCollector({r.domain: r.sensor for r in self.readers})))
        if self.readers:
            self._task = asyncio.create_task(self._run(), name="power-readers")

    async def async_stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        while self._undo:
            self._undo.pop()()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = dict.fromkeys(range(len(self.readers)), loop.time())
        while True:
            now = loop.time()
            for i, reader in enumerate(self.readers):
                if due[i] > now:
                    continue
                try:
                    reading = await reader.sensor.async_read()
                except Exception as exc:  # sensors count their own failures; a bug must not stop the others
                    log.error("power sensor of %s failed: %s", reader.domain, exc)
                    reading = None
                reader.watts = reading.watts if reading is not None else None
                # Absolute deadlines (no drift); after a long stall skip to the next one.
                due[i] = max(due[i] + reader.interval_s, now)
            await asyncio.sleep(max(0.0, min(due.values()) - loop.time()))


def build_sensor(domain: DomainConfig, link: McuLink | None) -> PowerSensor:
    if domain.source == "hwmon":
        return HwmonSensor(hwmon_options(domain))
    if link is None:  # config checks prevent this; say what is missing if it is used directly
        raise ValueError(f"domain {domain.name}: source=mcu needs an [mcu] section")
    return McuPowerSensor(domain.options, link=link)


# -- export --------------------------------------------------------------------------------------


class SourcesCollector:
    """Counters of the sources, read at scrape time. prometheus-client calls `collect` from its
    HTTP thread: it only copies fixed-key dicts of ints, which is safe without a lock."""

    def __init__(self, someip: Sequence[SomeIpSource], mcu: McuSource | None) -> None:
        self._someip = tuple(someip)
        self._mcu = mcu

    def set_someip(self, someip: Sequence[SomeIpSource]) -> None:
        """The endpoints a reload rebuilt (one tuple swap: safe against a scrape under way)."""
        self._someip = tuple(someip)

    def collect(self) -> Iterable[Metric]:
        yield from self._collect_someip()
        yield from self._collect_mcu()

    def _collect_someip(self) -> Iterable[Metric]:
        if not self._someip:
            return
        datagrams = CounterMetricFamily("cerebellumd_someip_datagrams", "SOME/IP datagrams received.",
                                        labels=["endpoint"])
        messages = CounterMetricFamily("cerebellumd_someip_messages", "SOME/IP notifications decoded.",
                                       labels=["endpoint"])
        errors = CounterMetricFamily("cerebellumd_someip_errors", "Bad SOME/IP input by kind.",
                                     labels=["endpoint", "kind"])
        for source in self._someip:
            counters = {**source.receiver.error_counters, "bind_failures": source.bind_failures}
            datagrams.add_metric([source.name], counters.get("datagrams", 0))
            messages.add_metric([source.name], counters.get("messages", 0))
            for kind in SOMEIP_ERROR_KINDS:
                errors.add_metric([source.name, kind], counters.get(kind, 0))
        yield from (datagrams, messages, errors)
        yield from self._collect_sd()

    def _collect_sd(self) -> Iterable[Metric]:
        sources = [s for s in self._someip if s.sd is not None]
        if not sources:
            return
        available = GaugeMetricFamily("cerebellumd_someip_sd_service_available",
                                      "1 while the configured SOME/IP service is offered (SD).",
                                      labels=["endpoint", "service", "instance"])
        subscribed = GaugeMetricFamily("cerebellumd_someip_sd_subscribed",
                                       "1 while the eventgroup subscription is acknowledged (SD).",
                                       labels=["endpoint", "service", "instance", "eventgroup"])
        errors = CounterMetricFamily("cerebellumd_someip_sd_errors",
                                     "Bad SOME/IP-SD input by kind (nack: a refused subscription).",
                                     labels=["endpoint", "kind"])
        reboots = CounterMetricFamily("cerebellumd_someip_sd_reboots", "SD partner reboots detected.",
                                      labels=["endpoint"])
        messages = CounterMetricFamily("cerebellumd_someip_sd_messages", "SOME/IP-SD messages by direction.",
                                       labels=["endpoint", "direction"])
        for source in sources:
            assert source.sd is not None
            client = source.sd.client
            for service, instance, up in client.availability():
                available.add_metric([source.name, f"0x{service:04x}", f"0x{instance:04x}"], 1.0 if up else 0.0)
            for service, instance, group, ok in client.subscriptions():
                subscribed.add_metric([source.name, f"0x{service:04x}", f"0x{instance:04x}", f"0x{group:04x}"],
                                      1.0 if ok else 0.0)
            counted = dict(client.errors)
            for kind in SD_ERROR_KINDS:
                errors.add_metric([source.name, kind], counted.get(kind, 0))
            counters = dict(client.counters)
            reboots.add_metric([source.name], counters.get("reboots", 0))
            messages.add_metric([source.name, "rx"], counters.get("received", 0))
            messages.add_metric([source.name, "tx"], counters.get("sent", 0))
        yield from (available, subscribed, errors, reboots, messages)

    def _collect_mcu(self) -> Iterable[Metric]:
        if self._mcu is None:
            return
        link = self._mcu.link
        counters = dict(link.all_counters)
        frames = CounterMetricFamily("cerebellumd_mcu_frames", "Valid MCU-link frames by direction.",
                                     labels=["direction"])
        frames.add_metric(["rx"], counters.get("frames", 0))
        frames.add_metric(["tx"], counters.get("frames_tx", 0))
        errors = CounterMetricFamily("cerebellumd_mcu_errors",
                                     "MCU-link errors by kind (garbage_bytes counts bytes).", labels=["kind"])
        for kind in (*MCU_PARSER_ERRORS, *MCU_LINK_ERROR_KINDS):
            errors.add_metric([kind], counters.get(kind, 0))
        connects = CounterMetricFamily("cerebellumd_mcu_connects", "Times the MCU serial port was opened.")
        connects.add_metric([], counters.get("connects", 0))
        requests = CounterMetricFamily("cerebellumd_mcu_requests", "Wake/sleep requests from the MCU.",
                                       labels=["kind"])
        for kind, n in dict(self._mcu.requests).items():
            requests.add_metric([kind], n)
        up = GaugeMetricFamily("cerebellumd_mcu_link_up", "1 while the MCU link is connected and not stale.")
        up.add_metric([], 0.0 if link.stale else 1.0)
        commands = CounterMetricFamily("cerebellumd_mcu_commands",
                                       "Power-down permissions and next wakes sent to the MCU, by result.",
                                       labels=["command", "result"])
        for (command, result), n in dict(self._mcu.commands).items():
            commands.add_metric([command, result], n)
        yield from (frames, errors, connects, requests, up, commands)



class SensorsCollector:
    """The power sensors' counters, read at scrape time (fixed-key dicts of ints)."""

    def __init__(self, sensors: Mapping[str, PowerSensor]) -> None:
        self._sensors = sensors

    def collect(self) -> Iterable[Metric]:
        reads = CounterMetricFamily("cerebellumd_sensor_reads", "Good power-sensor reads.", labels=["domain"])
        errors = CounterMetricFamily("cerebellumd_sensor_errors", "Failed power-sensor reads by kind.",
                                     labels=["domain", "kind"])
        for domain, sensor in self._sensors.items():
            counters = dict(getattr(sensor, "counters", {}))
            reads.add_metric([domain], counters.pop("reads", 0))
            for kind, n in counters.items():
                errors.add_metric([domain, kind], n)
        yield from (reads, errors)
