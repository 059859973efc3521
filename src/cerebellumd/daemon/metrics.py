"""The telemetry contract (ARCHITECTURE.md §6) on prometheus-client, in a registry of the
daemon's own so that several daemons (tests, demo) can live in one process.

Every series with a bounded label set is created up front so it exists at 0 from the first
scrape; label values come only from the config (domains, demands, signals, buses)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.registry import Collector

from ..accel import ALL_STATES, AccelState

M = TypeVar("M")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TICK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
DECISION_BUCKETS = (0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)
RELOAD_RESULTS = ("ok", "error", "restart_required")
#: The consumers' reports on wakes (the MQTT commands of the same names, daemon/control.py).
CONSUMER_REPORTS = ("late", "served")
CAN_ERROR_KINDS = ("decode", "range", "unknown_id", "error_frame", "bus_error", "silent", "reconnect")


class Metrics:
    def __init__(
        self,
        *,
        domains: Iterable[str] = (),
        measured_domains: Iterable[str] = (),
        demands: Iterable[str] = (),
        signals: Iterable[str] = (),
        buses: Iterable[str] = (),
        loops: Iterable[str] = ("decision",),
        mqtt: bool = False,
    ) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.accelerator_state = Gauge(
            "cerebellumd_accelerator_state", "1 for the accelerator's current state, 0 otherwise.",
            ["state"], registry=r)
        self.domain_power = Gauge(
            "cerebellumd_domain_power_watts", "Power of a domain in watts (measured or modelled).",
            ["domain", "source"], registry=r)
        self.domain_energy = Counter(
            "cerebellumd_domain_energy_joules", "Energy used by a domain in joules since start.",
            ["domain"], registry=r)
        self.accelerator_energy = Counter(
            "cerebellumd_accelerator_energy_joules",
            "Energy of the accelerator's domain ([power] accelerator_domain) since start, by the reason behind the "
            "policy's target while it was used (hold:* and learned:* collapse to hold and learned).",
            ["reason"], registry=r)
        self.wakes = Counter("cerebellumd_wakes", "Accelerator wake cycles by reason.", ["reason"], registry=r)
        self.sleeps = Counter(
            "cerebellumd_sleeps", "Accelerator step-downs by resting state and reason.",
            ["state", "reason"], registry=r)
        self.wake_latency = Histogram(
            "cerebellumd_wake_latency_seconds", "Time from wake command to accelerator active.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.demand_active = Gauge(
            "cerebellumd_demand_active", "1 while a demand is active (validated).", ["demand"], registry=r)
        self.wake_validations = Counter(
            "cerebellumd_wake_validations", "Wake validations of normal demands by result.",
            ["result"], registry=r)
        self.consumer_reports = Counter(
            "cerebellumd_consumer_reports", "Consumers' reports on wakes handed to the policy (MQTT commands late "
            "and served), by kind.", ["kind"], registry=r)
        self.tick_lateness = Histogram(
            "cerebellumd_tick_lateness_seconds", "Lateness of each loop tick behind its deadline.",
            ["loop"], buckets=TICK_BUCKETS, registry=r)
        self.tick_overruns = Counter(
            "cerebellumd_tick_overruns", "Loop periods missed entirely.", ["loop"], registry=r)
        self.decision_seconds = Histogram(
            "cerebellumd_decision_seconds", "CPU time of one policy decision.",
            buckets=DECISION_BUCKETS, registry=r)
        self.can_frames = Counter("cerebellumd_can_frames", "CAN frames received.", ["bus"], registry=r)
        self.can_tx_frames = Counter(
            "cerebellumd_can_tx_frames", "Frames the daemon transmitted or tried to, by bus and result (refused: "
            "the bus is listen_only).", ["bus", "result"], registry=r)
        self.can_errors = Counter(
            "cerebellumd_can_errors", "CAN errors by kind (decode, range: a value outside its DBC range, unknown_id, "
            "error_frame, bus_error: the bus failed to read or to open, silent, reconnect: an attempt to reopen it).",
            ["bus", "kind"], registry=r)
        self.can_connected = Gauge(
            "cerebellumd_can_connected", "1 while the CAN bus is open; 0 while it is being opened or reopened "
            "(each attempt counted in cerebellumd_can_errors_total{kind=\"reconnect\"}).", ["bus"], registry=r)
        self.ingest_dropped = Counter(
            "cerebellumd_ingest_dropped", "Frames dropped: the ingest queue was full (reader-thread buses), "
            "or the kernel's socket receive buffer was (buses read on the loop).",
            ["bus"], registry=r)
        self.signal_stale = Gauge(
            "cerebellumd_signal_stale", "1 while a signal is stale (older than max_age_ms).",
            ["signal"], registry=r)
        self.holds_active = Gauge("cerebellumd_holds_active", "Operator holds and leases in force.", registry=r)
        self.config_reloads = Counter(
            "cerebellumd_config_reloads", "Configuration reloads by result.", ["result"], registry=r)
        # Exported only where MQTT is configured: a constant 0 elsewhere would fire the
        # "MQTT disconnected" alert on every node that does not use a broker.
        self.mqtt_connected = Gauge(
            "cerebellumd_mqtt_connected", "1 while connected to the MQTT broker.", registry=r if mqtt else None)
        # Beyond the contract: what the daemon itself and its commands cost and reject.
        self.actuation_failures = Counter(
            "cerebellumd_actuation_failures", "Accelerator commands that failed, timed out or read back wrong.",
            ["kind"], registry=r)
        self.denied_wakes = Counter(
            "cerebellumd_denied_wakes", "Demands kept from waking by a guard, hold or cap.", ["reason"], registry=r)
        self.commands = Counter(
            "cerebellumd_commands", "Operator commands by source and result.", ["source", "result"], registry=r)

        self._owned: dict[str, object] = {}
        self._demand_labels: set[tuple[str]] = set()
        self._signal_labels: set[tuple[str]] = set()
        measured = set(measured_domains)
        for state in ALL_STATES:
            self.accelerator_state.labels(state.value).set(0)
        for domain in domains:
            self.domain_power.labels(domain, "sensor" if domain in measured else "model").set(0)
            self.domain_energy.labels(domain)
        self.prepare(demands=demands, signals=signals)
        for bus in buses:
            self.can_frames.labels(bus)
            self.can_connected.labels(bus).set(0)
            self.ingest_dropped.labels(bus)
            for result in ("ok", "error", "refused"):
                self.can_tx_frames.labels(bus, result)
            for kind in CAN_ERROR_KINDS:
                self.can_errors.labels(bus, kind)
        for loop in loops:
            self.tick_lateness.labels(loop)
            self.tick_overruns.labels(loop)
        for result in ("validated", "expired"):
            self.wake_validations.labels(result)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        for kind in CONSUMER_REPORTS:
            self.consumer_reports.labels(kind)
        self.mqtt_connected.set(0)
        self.holds_active.set(0)
        self._state = AccelState.UNKNOWN
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def prepare(self, *, demands: Iterable[str] = (), signals: Iterable[str] = ()) -> None:
        """Series for the config's demands and signals exist at 0 from the first scrape (also for
        those a reload adds; existing ones keep their value)."""
        for demand in demands:
            if (demand,) not in self._demand_labels:
                self._demand_labels.add((demand,))
                self.demand_active.labels(demand).set(0)
        for signal in signals:
            if (signal,) not in self._signal_labels:
                self._signal_labels.add((signal,))
                self.signal_stale.labels(signal).set(0)

    # Parts beyond the contract get their metrics here. Get-or-create by name: a part rebuilt on
    # reload keeps its series (counters do not restart at 0) instead of registering twice.

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return self._own(name, Counter, lambda: Counter(name, doc, labels, registry=self.registry))

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._own(name, Gauge, lambda: Gauge(name, doc, labels, registry=self.registry))

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._own(name, Histogram,
                         lambda: Histogram(name, doc, labels, buckets=buckets, registry=self.registry))

    def _own(self, name: str, kind: type[M], create: Callable[[], M]) -> M:
        existing = self._owned.get(name)
        if existing is None:
            existing = self._owned[name] = create()
        if not isinstance(existing, kind):
            raise TypeError(f"metric {name} exists as a {type(existing).__name__}")
        return existing

    def set_state(self, state: AccelState) -> None:
        if state is self._state:
            return
        self.accelerator_state.labels(self._state.value).set(0)
        self.accelerator_state.labels(state.value).set(1)
        self._state = state

    def register(self, collector: Collector) -> Callable[[], None]:
        """Register a part's collector; returns the undo (unregister)."""
        self.registry.register(collector)
        registered = True

        def undo() -> None:
            nonlocal registered
            if registered:  # twice is harmless, as for every undo
                registered = False
                self.registry.unregister(collector)

        return undo

    async def async_serve(self, address: str, port: int, exposed: Collector | None = None) -> int:
        """Serve /metrics from prometheus-client's thread (`exposed`: the collector it renders,
        the registry by default); returns the bound port."""
        server, thread = await asyncio.to_thread(start_http_server, port, address, exposed or self.registry)
        self._server, self._thread = server, thread
        return int(server.server_port)

    async def async_stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(_shutdown, server)


def _shutdown(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()
